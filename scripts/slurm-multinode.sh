#!/usr/bin/env bash
# A real three-node Slurm cluster on this one machine, for the Slurm runner's multi-node tests.
#
#   scripts/slurm-multinode.sh up            (re)create it from nothing; idempotent, ~3 s
#   scripts/slurm-multinode.sh down          remove every trace of it; idempotent, <1 s
#   scripts/slurm-multinode.sh kill-node n2  node failure: SIGKILL everything in n2 (slurmd, jobs, agents)
#   scripts/slurm-multinode.sh revive-node n2   mark n2 down (ends its jobs), restart its slurmd, wait until idle
#
# Nodes n1-n3 each live in their own network namespace (10.77.0.11-13, hostname n1-n3) on a
# bridge whose host side is 10.77.0.1, where the controller listens (port 6827). A login node
# (10.77.0.20, its own namespace) runs sshd, for submitting over SSH as on a real site. The
# one-node cluster of scripts/slurm-up.sh keeps running beside it, untouched.
# From this host: SLURM_CONF=$BASE/etc/slurm.conf sinfo; ssh -i $BASE/ssh/id_ed25519 root@10.77.0.20.
# The namespaces have no default route: nothing from the nodes leaves 10.77.0.0/24.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/slurm-common.sh"

BASE=${ARSERVICE_MN_BASE:-/tmp/arservice-mn}
BRIDGE=arsmn0
NET=10.77.0
CTLD_PORT=6827
NODE_CPUS=${ARSERVICE_MN_CPUS:-2}
NODES=(n1 n2 n3)
declare -A ADDRESS=([n1]=$NET.11 [n2]=$NET.12 [n3]=$NET.13 [login]=$NET.20)
HOST=$(hostname -s)

log() { echo "slurm-multinode: $*" >&2; }
export SLURM_CONF=$BASE/etc/slurm.conf

# Run a command as host $1: in its network namespace, with its own hostname and a private mount
# namespace that shows its own view of /sys (`ip netns exec` would hide /sys/fs/cgroup, which
# slurmd needs), this cluster's hosts file and this cluster's /etc/slurm.
in_node() {
  local node=$1; shift
  nsenter --net="/run/netns/$node" unshare --uts --mount --propagation slave sh -ec '
    node=$1 base=$2; shift 2
    hostname "$node"
    mkdir -p "$base/mnt/$node"
    mount --rbind /sys/fs/cgroup "$base/mnt/$node"
    umount -l /sys && mount -t sysfs sysfs /sys && mount --move "$base/mnt/$node" /sys/fs/cgroup
    mount --bind "$base/hosts" /etc/hosts
    mount --bind "$base/etc" /etc/slurm
    exec "$@"' sh "$node" "$BASE" "$@"
}

kill_namespace() {  # SIGKILL every process in network namespace $1 until none is left
  local pids
  for _ in $(seq 50); do
    pids=$(ip netns pids "$1" 2>/dev/null) || return 0
    [ -z "$pids" ] && return 0
    kill -9 $pids 2>/dev/null || true
    sleep 0.05
  done
  log "processes left in namespace $1: $pids"; return 1
}

down() {
  # The controller is known by its pid file, checked against its own process name (mn-slurmctld)
  # so that a stale file never makes us kill anything else. Its child slurmscriptd goes with it.
  local pid
  if pid=$(cat "$BASE/run/slurmctld.pid" 2>/dev/null) && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = mn-slurmctld ]; then
    kill -9 "$pid" $(pgrep -P "$pid") 2>/dev/null || true
  fi
  for node in "${NODES[@]}" login; do
    [ -e "/run/netns/$node" ] || continue
    kill_namespace "$node"
    ip link del "mn-$node" 2>/dev/null || true  # at once: namespace deletion frees its veth only later
    ip netns del "$node"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -rf "$BASE"
}

# LLN (least loaded node first) spreads single-node jobs over the nodes, as on a busy real cluster,
# instead of packing them on n1. A job in partition `urgent` preempts jobs of `mn` that stand in
# its way, and Slurm requeues them (they keep their id and run again later), as on sites that
# let priority work evict the rest.
write_config() {
  { echo "127.0.0.1 localhost"; echo "$NET.1 $HOST"
    for node in "${NODES[@]}" login; do echo "${ADDRESS[$node]} $node"; done; } >"$BASE/hosts"
  cat >"$BASE/etc/slurm.conf" <<EOF
# written by arservice scripts/slurm-multinode.sh
ClusterName=arservice-mn
SlurmctldHost=$HOST($NET.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=6818
CredType=cred/munge
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
MailProg=/bin/true
$(slurm_conf_common)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=n[1-3] NodeAddr=$NET.1[1-3] CPUs=$NODE_CPUS RealMemory=1000 State=UNKNOWN
PartitionName=mn Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES LLN=YES PriorityTier=1
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

start_sshd() {
  ssh-keygen -q -t ed25519 -N '' -f "$BASE/ssh/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$BASE/ssh/id_ed25519"
  cp "$BASE/ssh/id_ed25519.pub" "$BASE/ssh/authorized_keys"
  cat >"$BASE/ssh/sshd_config" <<EOF
ListenAddress ${ADDRESS[login]}:22
HostKey $BASE/ssh/host_key
PidFile $BASE/run/sshd.pid
AuthorizedKeysFile $BASE/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
EOF
  mkdir -p -m 755 /run/sshd  # sshd's privilege separation directory
  in_node login /usr/sbin/sshd -f "$BASE/ssh/sshd_config" -E "$BASE/log/sshd.log"
}

wait_idle() {  # $1: what sinfo must show, e.g. "idle 3"
  for _ in $(seq 150); do
    [ "$(sinfo -h -o '%t %D' 2>/dev/null)" = "$1" ] && return 0
    sleep 0.1
  done
  sinfo >&2 || true; log "nodes are not '$1'; see $BASE/log"; return 1
}

up() {
  down
  if ! pgrep -x munged >/dev/null; then
    log "munged is not running; starting it with scripts/slurm-up.sh"
    "$(dirname "$0")/slurm-up.sh"
  fi
  mkdir -p "$BASE"/{etc,state,spool,log,run,bin,ssh,mnt} /etc/slurm
  # Our daemons run under their own names, so that slurm-up.sh's `pgrep -x slurmd` and this
  # cluster never mistake each other's processes.
  ln -s "$(command -v slurmctld)" "$BASE/bin/mn-slurmctld"
  ln -s "$(command -v slurmd)" "$BASE/bin/mn-slurmd"
  ip link add "$BRIDGE" type bridge
  echo 1 >"/proc/sys/net/ipv6/conf/$BRIDGE/disable_ipv6"
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for node in "${NODES[@]}" login; do
    ip netns add "$node"
    ip netns exec "$node" sysctl -qw net.ipv6.conf.default.disable_ipv6=1
    ip link add "mn-$node" type veth peer name eth0 netns "$node"
    echo 1 >"/proc/sys/net/ipv6/conf/mn-$node/disable_ipv6"
    ip link set "mn-$node" master "$BRIDGE" up
    ip -n "$node" addr add "${ADDRESS[$node]}/24" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" link set lo up
  done
  write_config
  # The controller stays in this host's network namespace (it binds every address; nodes reach it
  # on the bridge), with the cluster's hosts file so that it resolves n1-n3.
  unshare --mount --propagation slave sh -c \
    "mount --bind '$BASE/hosts' /etc/hosts && exec '$BASE/bin/mn-slurmctld' -f '$SLURM_CONF'"
  for node in "${NODES[@]}"; do in_node "$node" "$BASE/bin/mn-slurmd" -N "$node"; done
  start_sshd
  wait_idle "idle ${#NODES[@]}"
  # The controller's first allocation comes ~3 s after start: take that delay here, with a job that
  # also proves every node runs steps, rather than in the first test.
  local job
  job=$(sbatch --parsable -N "${#NODES[@]}" -t 1 -o "$BASE/log/ready.out" --wrap 'srun true')
  for _ in $(seq 300); do [ -z "$(squeue -h -j "$job" 2>/dev/null)" ] && break; sleep 0.1; done
  scontrol show job "$job" | grep -q 'JobState=COMPLETED' || {
    cat "$BASE/log/ready.out" >&2; log "the readiness job did not complete"; exit 1; }
  log "up: nodes ${NODES[*]} idle, controller $NET.1:$CTLD_PORT, login ${ADDRESS[login]}"
}

check_node() { [[ " ${NODES[*]} " == *" $1 "* ]] || { log "no node '$1' (nodes: ${NODES[*]})"; exit 2; }; }

kill_node() {  # what a node failure looks like to Slurm: the node falls silent; the controller is not told
  check_node "$1"
  kill_namespace "$1"
}

revive_node() {
  check_node "$1"
  kill_namespace "$1"
  # Down ends whatever the controller still believes runs there; ReturnToService=2 brings the node
  # back as soon as its slurmd registers again.
  scontrol update NodeName="$1" State=DOWN Reason=revive
  in_node "$1" "$BASE/bin/mn-slurmd" -N "$1"
  for _ in $(seq 150); do
    [ "$(sinfo -h -n "$1" -o %t)" = idle ] && return 0
    sleep 0.1
  done
  sinfo -n "$1" >&2; log "node $1 did not come back; see $BASE/log"; exit 1
}

case ${1:-} in
  up) up ;;
  down) down ;;
  kill-node) kill_node "${2:?node name}" ;;
  revive-node) revive_node "${2:?node name}" ;;
  *) echo "usage: $0 up|down|kill-node NODE|revive-node NODE" >&2; exit 2 ;;
esac
