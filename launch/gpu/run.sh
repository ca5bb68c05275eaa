#!/usr/bin/env bash
# Runs training on the GPUs of this host: one JAX process drives all of its GPUs. On several
# hosts, start it on each with the same --coordinator and --num-processes and each host's own
# --process-id, which become the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID the
# trainer's maybe_initialize_distributed reads. Under SLURM (launch/gpu/slurm.sh) it runs once
# per GPU and the trainer finds its peers from SLURM's variables.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu/run.sh [options] -- TRAIN_ARGS

Runs `python -m valley_jax.train TRAIN_ARGS` from the repository root with the XLA flags GPUs
want. Examples:

  # one host, all its GPUs
  launch/gpu/run.sh -- --config=configs/finetune.py:7b --workdir=/shared/valley/ft7b
  # two hosts (run on each; host 0's address is the coordinator)
  launch/gpu/run.sh --coordinator=10.0.0.1:8476 --num-processes=2 --process-id=0 -- ...

  --gpus=LIST             CUDA_VISIBLE_DEVICES for the run (default: all GPUs)
  --coordinator=HOST:PORT process 0's address, reachable from every host
  --num-processes=N       number of hosts (processes)
  --process-id=I          this host's rank, 0 .. N-1
  --python=PATH           default: python
  --print-xla-flags       print the XLA flags (e.g. for valley_jax.aot) and exit
  --dry-run               print the command instead of running it
  -h, --help              this help
EOF
}

# Why each flag:
#   latency-hiding scheduler   overlaps FSDP's all-gathers / reduce-scatters with the matmuls
#   pipelined collectives      lets the scanned layers prefetch the next layer's weights
#   combine thresholds         fewer, larger collectives (each NCCL launch has a fixed cost)
#   command buffers            fusions and custom calls replayed as CUDA graphs: fewer launches
# Any XLA_FLAGS already in the environment come after these, so that they win.
GPU_XLA_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL
)
# JAX preallocates 75 % of each GPU by default; NCCL and cuBLAS need a little of the rest.
MEM_FRACTION=0.9

GPUS=""
COORDINATOR=""
NUM_PROCESSES=""
PROCESS_ID=""
PYTHON=python
split_flags "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --gpus) need_value "$@"; GPUS="$2"; shift ;;
    --coordinator) need_value "$@"; COORDINATOR="$2"; shift ;;
    --num-processes) need_value "$@"; NUM_PROCESSES="$2"; shift ;;
    --process-id) need_value "$@"; PROCESS_ID="$2"; shift ;;
    --python) need_value "$@"; PYTHON="$2"; shift ;;
    --print-xla-flags) echo "${GPU_XLA_FLAGS[*]}"; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument $1 (training arguments go after --; see --help)" ;;
  esac
  shift
done
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "no training arguments: -- --config=... --workdir=..."
if [[ -n "$COORDINATOR$NUM_PROCESSES$PROCESS_ID" ]]; then
  [[ -n "$COORDINATOR" && -n "$NUM_PROCESSES" && -n "$PROCESS_ID" ]] ||
    die "--coordinator, --num-processes and --process-id go together"
fi

xla_flags="${GPU_XLA_FLAGS[*]}"
[[ -z "${XLA_FLAGS:-}" ]] || xla_flags+=" $XLA_FLAGS"
env_vars=("XLA_FLAGS=$xla_flags" "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")
[[ -z "$GPUS" ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$GPUS")
if [[ -n "$COORDINATOR" ]]; then
  env_vars+=("JAX_COORDINATOR_ADDRESS=$COORDINATOR" "JAX_NUM_PROCESSES=$NUM_PROCESSES"
             "JAX_PROCESS_ID=$PROCESS_ID")
fi

cd "$VALLEY_ROOT"  # config paths in TRAIN_ARGS are relative to the repository
run_exec env "${env_vars[@]}" "$PYTHON" -m valley_jax.train "${TRAIN_ARGS[@]}"
