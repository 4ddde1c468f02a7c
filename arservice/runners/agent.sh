#!/usr/bin/env bash
#SBATCH --job-name=arservice-agent
#SBATCH --ntasks=1
#SBATCH --output=arservice-agent-%j.out
# One arservice agent in a Slurm allocation, connecting back to the broker.
#
#   sbatch sbatch/agent.sh --broker tcp://BROKER_HOST:5555 [--instances 4] [any `arservice agent` option]
#   ARSERVICE_BROKER=tcp://BROKER_HOST:5555 sbatch --cpus-per-task=8 --mem=32g sbatch/agent.sh
#
# The agent offers the allocation's CPUs and memory (SLURM_CPUS_PER_TASK, SLURM_MEM_PER_NODE or
# SLURM_MEM_PER_CPU) and reports SLURM_JOB_ID when it registers. Options given to the script come
# last, so they win. Environment: ARSERVICE_BROKER, ARSERVICE_INSTANCES (instances per agent,
# default 4), ARSERVICE_TOKEN or ARSERVICE_TOKEN_FILE (the broker's shared secret),
# ARSERVICE_PYTHON (the Python that has arservice installed, default python3).
# scancel sends SIGTERM: the agent closes every instance it holds, then exits.
set -euo pipefail

cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
memory=${SLURM_MEM_PER_NODE:-}
if [ -z "$memory" ] && [ -n "${SLURM_MEM_PER_CPU:-}" ] && [ -n "$cpus" ]; then
  memory=$(( SLURM_MEM_PER_CPU * cpus ))
fi

args=()
[ -n "$cpus" ] && args+=(--cpus "$cpus")
[ -n "$memory" ] && args+=(--memory "$memory")
exec "${ARSERVICE_PYTHON:-python3}" -m arservice agent "${args[@]}" "$@"
