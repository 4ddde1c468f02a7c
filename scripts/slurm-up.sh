#!/usr/bin/env bash
# Make sure a one-node Slurm cluster (slurm-wlm + munge) runs here, for the Slurm runner's tests.
# Writes /etc/slurm/slurm.conf for this host when there is none of ours, starts munged,
# slurmctld and slurmd, and waits until the node takes jobs. Idempotent.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/slurm-common.sh"

log() { echo "slurm-up: $*" >&2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm munge"
  "$(dirname "$0")/apt-install.sh" slurm-wlm munge
fi

[ -f /etc/munge/munge.key ] || mungekey --create
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
  log "starting munged"
  runuser -u munge -- munged --force
fi

conf=/etc/slurm/slurm.conf
host=$(hostname)
if ! grep -q "^# written by arservice slurm-up for $host\$" "$conf" 2>/dev/null; then
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
  log "writing $conf (node $host, $(nproc) CPUs, ${mem} MiB)"
  mkdir -p /etc/slurm
  cat >"$conf" <<CONF
# written by arservice slurm-up for $host
ClusterName=arservice-test
SlurmctldHost=$host
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$(slurm_conf_common)
NodeName=$host CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  pkill -x slurmctld || true
  pkill -x slurmd || true
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm

pgrep -x slurmctld >/dev/null || { log "starting slurmctld"; slurmctld; }
pgrep -x slurmd >/dev/null || { log "starting slurmd"; slurmd; }

for _ in $(seq 1 60); do
  state=$(sinfo -h -o %t 2>/dev/null | head -1 || true)
  case $state in idle|mix|alloc) break ;; esac
  sleep 0.5
done
case $state in
  idle|mix|alloc) log "slurm is up (node $host: $state)" ;;
  *) log "the node did not come up (state: '${state:-none}'); see /var/log/slurm/"; exit 1 ;;
esac
