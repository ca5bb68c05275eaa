#!/usr/bin/env bash
# Follows the training log of a TPU slice: worker 0 (process 0 writes the progress lines and
# metrics) or another worker, or all of them (gcloud prefixes nothing: use one at a time to
# read a worker's own errors).
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: launch/tpu/logs.sh --name=NAME [--worker=N|all] [--lines=N]

  --name=NAME           TPU name (default: $TPU_NAME)
  --zone=ZONE           default: gcloud's compute/zone
  --project=PROJECT     default: gcloud's core/project
  --worker=N|all        whose log (default 0)
  --lines=N             start with the last N lines (default 100)
  --dry-run             print the command instead of running it
  -h, --help            this help
EOF_USAGE
}

WORKER=0
LINES=100
wants_help "$@" && { usage; exit 0; }
split_flags "$@"
parse_common
set -- ${REST[@]+"${REST[@]}"}
while (($#)); do
  case "$1" in
    --worker) need_value "$@"; WORKER="$2"; shift ;;
    --lines) need_value "$@"; LINES="$2"; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

run gcloud compute tpus tpu-vm ssh "$NAME" --worker="$WORKER" ${LOCATION[@]+"${LOCATION[@]}"} \
  --command="tail -n $LINES -F ~/$REMOTE_LOG"
