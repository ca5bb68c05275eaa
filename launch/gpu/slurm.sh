#!/usr/bin/env bash
# Submits a multi-host GPU training job to SLURM: one task (one JAX process) per GPU, JAX's own
# SLURM layout: jax.distributed's SLURM detection gives each process the GPU of its
# SLURM_LOCALID, and each process loads its share of the batch.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: launch/gpu/slurm.sh --nodes=N [options] -- TRAIN_ARGS

Submits launch/gpu/slurm.sbatch, which starts launch/gpu/run.sh TRAIN_ARGS once per GPU with
srun. The trainer sees SLURM_NTASKS > 1 and joins the processes with jax.distributed's SLURM
detection. Example:

  launch/gpu/slurm.sh --nodes=2 --partition=a3 -- --config=configs/pretrain.py:13b \
      --workdir=/shared/valley/pretrain-13b

  --nodes=N             hosts
  --gpus-per-node=G     default 8
  --partition=NAME      SLURM partition (default: the cluster's)
  --account=NAME        SLURM account (default: yours)
  --time=LIMIT          wall-clock limit, e.g. 2-00:00:00 (default: the partition's)
  --job-name=NAME       default valley
  --output=PATTERN      log file (default logs/%x-%j.out, in the repository)
  --dry-run             print the command instead of running it
  -h, --help            this help
EOF_USAGE
}

NODES=""
GPUS_PER_NODE=8
PARTITION=""
ACCOUNT=""
TIME=""
JOB_NAME=valley
OUTPUT="logs/%x-%j.out"
split_flags "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nodes) need_value "$@"; NODES="$2"; shift ;;
    --gpus-per-node) need_value "$@"; GPUS_PER_NODE="$2"; shift ;;
    --partition) need_value "$@"; PARTITION="$2"; shift ;;
    --account) need_value "$@"; ACCOUNT="$2"; shift ;;
    --time) need_value "$@"; TIME="$2"; shift ;;
    --job-name) need_value "$@"; JOB_NAME="$2"; shift ;;
    --output) need_value "$@"; OUTPUT="$2"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument $1 (training arguments go after --; see --help)" ;;
  esac
  shift
done
[[ -n "$NODES" ]] || die "--nodes is required"
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "no training arguments: -- --config=... --workdir=..."

# --chdir: the batch script runs from a copy in SLURM's spool folder; the job works in the repo.
# --signal: SIGTERM 5 minutes before the time limit, so that the trainer checkpoints in time.
submit=(sbatch --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE"
        --gpus-per-node="$GPUS_PER_NODE" --exclusive --chdir="$VALLEY_ROOT" --output="$OUTPUT"
        --signal=TERM@300)
[[ -z "$PARTITION" ]] || submit+=(--partition="$PARTITION")
[[ -z "$ACCOUNT" ]] || submit+=(--account="$ACCOUNT")
[[ -z "$TIME" ]] || submit+=(--time="$TIME")
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$VALLEY_ROOT/$(dirname -- "$OUTPUT")"
run "${submit[@]}" "$VALLEY_ROOT/launch/gpu/slurm.sbatch" -- "${TRAIN_ARGS[@]}"
