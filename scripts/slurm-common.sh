# Sourced by slurm-up.sh (one node) and slurm-multinode.sh (three nodes): the slurm.conf lines
# both clusters share. Root runs everything, munge authenticates, no accounting or cgroups (the
# tests run in containers without systemd), and a scheduling pass every second so that a job
# waits at most that long for its allocation.
slurm_conf_common() {
  cat <<'CONF'
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MpiDefault=none
SchedulerParameters=sched_interval=1
CONF
}
