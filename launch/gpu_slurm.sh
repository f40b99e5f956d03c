#!/usr/bin/env bash
# Train on GPU nodes under SLURM, one process per GPU: launch/gpu_slurm.sh CONFIG --workdir=DIR [--config.key=value ...]
#
# One script, three roles:
#   on a login node (no SLURM_JOB_ID)  submits itself with sbatch;
#   as the batch job                   sruns itself once per task (NODES x GPUS_PER_NODE tasks);
#   as a task (SLURM_PROCID set)       execs `python -m m3jax.train --config=CONFIG ARGS`. With no coordinator in
#                                      the config, jax.distributed.initialize() reads SLURM_JOB_ID, SLURM_NTASKS,
#                                      SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NODELIST: the coordinator is the
#                                      first node, port 61440 + SLURM_JOB_ID % 4096 (JAX_COORDINATOR_PORT overrides),
#                                      and each task keeps the GPU numbered SLURM_LOCALID.
# From your own batch script or salloc, `srun launch/gpu_slurm.sh ...` runs the tasks directly.
#
# Submission settings (environment):
#   NODES=1  GPUS_PER_NODE=8  TIME=24:00:00  JOB_NAME=m3jax
#   PARTITION, ACCOUNT       passed to sbatch when set
#   OUTPUT=runs/slurm/%x-%j.out   the job's log (%x job name, %j job id); srun prefixes each line with its task
#   PY=.venv/bin/python      the interpreter on the nodes (with jax[cuda]); the checkout must be on a shared disk
# sbatch also reads its own SBATCH_* variables (SBATCH_QOS, SBATCH_RESERVATION, SBATCH_EXCLUSIVE, ...).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: launch/gpu_slurm.sh CONFIG --workdir=DIR [--config.key=value ...]" >&2
  exit 2
fi
# sbatch runs a spooled copy of this file: the submitting side passes the checkout on as M3JAX_REPO.
if [[ -z ${SLURM_JOB_ID:-} || -z ${M3JAX_REPO:-} ]]; then
  here=${BASH_SOURCE[0]%/*}
  if [[ $here == "${BASH_SOURCE[0]}" ]]; then here=.; fi
  M3JAX_REPO=$(cd "$here/.." && pwd)
fi
export M3JAX_REPO
cd "$M3JAX_REPO"
self=$M3JAX_REPO/launch/gpu_slurm.sh

if [[ -z ${SLURM_JOB_ID:-} ]]; then  # login node: submit
  if ! command -v sbatch >/dev/null 2>&1; then
    echo "launch/gpu_slurm.sh: sbatch not found: run this on a SLURM login node, or inside an allocation" \
      "as 'srun launch/gpu_slurm.sh CONFIG ...'" >&2
    exit 127
  fi
  gpus=${GPUS_PER_NODE:-8}
  output=${OUTPUT:-runs/slurm/%x-%j.out}
  mkdir -p "$(dirname "$output")"
  opts=(--job-name="${JOB_NAME:-m3jax}" --nodes="${NODES:-1}" --ntasks-per-node="$gpus" --gpus-per-node="$gpus"
        --time="${TIME:-24:00:00}" --output="$output" --chdir="$M3JAX_REPO" --export=ALL)
  if [[ -n ${PARTITION:-} ]]; then opts+=(--partition="$PARTITION"); fi
  if [[ -n ${ACCOUNT:-} ]]; then opts+=(--account="$ACCOUNT"); fi
  export M3JAX_SLURM_STEP=batch
  exec sbatch "${opts[@]}" "$self" "$@"
fi

if [[ -z ${SLURM_PROCID:-} || ${M3JAX_SLURM_STEP:-} == batch ]]; then  # the batch job (or salloc): one task per GPU
  export M3JAX_SLURM_STEP=task
  exec srun --kill-on-bad-exit=1 --label bash "$self" "$@"
fi

# A task: JAX's SLURM detection starts jax.distributed (m3jax.parallel.initialize_distributed, SLURM_NTASKS > 1).
PY=${PY:-.venv/bin/python}
config=$1; shift
exec "$PY" -m m3jax.train --config="$config" "$@"
