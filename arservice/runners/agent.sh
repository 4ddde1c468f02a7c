#!/usr/bin/env bash
#SBATCH --job-name=arservice-agent
#SBATCH --ntasks=1
#SBATCH --output=arservice-agent-%j.out
# arservice agents in a Slurm allocation, connecting back to the broker: one per task.
#
#   sbatch sbatch/agent.sh --broker tcp://BROKER_HOST:5555 [--instances 4] [any `arservice agent` option]
#   ARSERVICE_BROKER=tcp://BROKER_HOST:5555 sbatch --cpus-per-task=8 --mem=32g sbatch/agent.sh
#   sbatch --ntasks=4 --cpus-per-task=2 sbatch/agent.sh --broker ...     (four agents, srun places them)
#
# An agent offers its share of the allocation: the task's CPUs (SLURM_CPUS_PER_TASK; alone in the
# job, every CPU on the node if none was asked for) and memory (SLURM_MEM_PER_NODE, or
# SLURM_MEM_PER_CPU times its CPUs), and reports SLURM_JOB_ID when it registers. Options given to
# the script come last, so they win. Environment: ARSERVICE_BROKER, ARSERVICE_INSTANCES (instances
# per agent, default 4), ARSERVICE_TOKEN or ARSERVICE_TOKEN_FILE (the broker's shared secret),
# ARSERVICE_PYTHON (the Python that has arservice installed, default python3).
# scancel sends SIGTERM (srun passes it on): each agent closes every instance it holds, then exits.
set -euo pipefail

# sbatch run from an SSH session (the runner's, over --slurm-ssh) passes on SSH_CLIENT, and bash
# takes that to mean sshd started it: every `bash -c` in an instance would source ~/.bashrc (0.2 s
# with pyenv or a module system there). They describe the submitter's session, not this job.
unset SSH_CLIENT SSH2_CLIENT SSH_CONNECTION SSH_TTY

python=${ARSERVICE_PYTHON:-python3}
tasks=${SLURM_NTASKS:-1}
if [ "$tasks" -gt 1 ] && [ -z "${SLURM_STEP_ID:-}" ]; then
  # The batch step of a multi-task job: this script, once per task. Its text goes along, since
  # its spooled copy ($0) exists only on this node and tasks may run on others.
  exec srun --kill-on-bad-exit=0 bash -c "$(cat "$0")" "$0" "$@"
fi

if [ "$tasks" -gt 1 ]; then
  cpus=${SLURM_CPUS_PER_TASK:-1}
  memory=""  # a per-node amount has no fair share per task; per-CPU amounts do
else
  cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
  memory=${SLURM_MEM_PER_NODE:-}
fi
if [ -z "$memory" ] && [ -n "${SLURM_MEM_PER_CPU:-}" ] && [ -n "$cpus" ]; then
  memory=$(( SLURM_MEM_PER_CPU * cpus ))
fi

args=()
[ -n "$cpus" ] && args+=(--cpus "$cpus")
[ -n "$memory" ] && args+=(--memory "$memory")
exec "$python" -m arservice agent "${args[@]}" "$@"
