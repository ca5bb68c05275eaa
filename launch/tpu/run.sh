#!/usr/bin/env bash
# Starts training on every worker of a TPU slice at once (one JAX process per worker; see
# worker.sh for the environment each gets), or stops it with --stop.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: launch/tpu/run.sh --name=NAME [options] -- TRAIN_ARGS
       launch/tpu/run.sh --name=NAME --stop

Runs `python -m valley_jax.train TRAIN_ARGS` on all workers of NAME, in the background (the
run outlives this command; follow it with launch/tpu/logs.sh). Example:

  launch/tpu/run.sh --name=valley-v5p -- --config=configs/finetune.py:7b \
      --workdir=/mnt/shared/valley/finetune-7b --config.init.checkpoint=/mnt/shared/stage1/model

The workdir must be one folder that every worker sees (see docs/scaling.md, "Checkpoints").

  --name=NAME           TPU name (default: $TPU_NAME)
  --zone=ZONE           default: gcloud's compute/zone
  --project=PROJECT     default: gcloud's core/project
  --env=KEY=VALUE       extra environment for the trainer on every worker (repeatable)
  --stop                SIGTERM the training on all workers: it checkpoints and exits
  --dry-run             print the commands instead of running them
  -h, --help            this help
EOF_USAGE
}

STOP=0
WORKER_ARGS=()
wants_help "$@" && { usage; exit 0; }
split_flags "$@"
parse_common
set -- ${REST[@]+"${REST[@]}"}
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --env) need_value "$@"; WORKER_ARGS+=("--env=$2"); shift ;;
    --stop) STOP=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument $1 (training arguments go after --; see --help)" ;;
  esac
  shift
done

if [[ "$STOP" == 1 ]]; then
  WORKER_ARGS+=(--stop)
else
  [[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "no training arguments: -- --config=... --workdir=..."
  WORKER_ARGS+=(-- "${TRAIN_ARGS[@]}")
fi
remote="cd ~/$REMOTE_REPO && bash launch/tpu/worker.sh $(shell_quote "${WORKER_ARGS[@]}")"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all ${LOCATION[@]+"${LOCATION[@]}"} \
  --command="$remote"
