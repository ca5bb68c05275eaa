#!/usr/bin/env bash
# Creates a Cloud TPU VM slice through a queued resource (the way capacity, spot or not, is
# granted today), and with --wait polls until it is ACTIVE.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu/create.sh --name=NAME --accelerator=TYPE [options]

Creates the TPU VM slice NAME (a queued resource and its node, both called NAME).

  --name=NAME           queued resource and TPU node name (default: $TPU_NAME)
  --accelerator=TYPE    v4-8, v5p-16, v5e-16 (= v5litepod-16), v6e-8, ...
  --zone=ZONE           default: gcloud's compute/zone
  --project=PROJECT     default: gcloud's core/project
  --runtime=VERSION     TPU software version (default by generation: v4 tpu-ubuntu2204-base,
                        v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --spot                spot capacity: cheaper, may be preempted (training resumes from the
                        last checkpoint when rerun)
  --wait                poll every 30 s until the slice is ACTIVE (fails if it FAILED)
  --dry-run             print the commands instead of running them
  -h, --help            this help

Next: launch/tpu/setup.sh --name=NAME, then launch/tpu/run.sh --name=NAME -- TRAIN_ARGS.
EOF
}

ACCELERATOR=""
RUNTIME=""
SPOT=0
WAIT=0
wants_help "$@" && { usage; exit 0; }
split_flags "$@"
parse_common
set -- ${REST[@]+"${REST[@]}"}
while (($#)); do
  case "$1" in
    --accelerator) need_value "$@"; ACCELERATOR="$2"; shift ;;
    --runtime) need_value "$@"; RUNTIME="$2"; shift ;;
    --spot) SPOT=1 ;;
    --wait) WAIT=1 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[[ -n "$ACCELERATOR" ]] || die "--accelerator is required (e.g. v5p-16)"

# gcloud calls v5e slices v5litepod-N; the aot tool and this script also accept v5e-N.
ACCELERATOR="${ACCELERATOR/#v5e-/v5litepod-}"
if [[ -z "$RUNTIME" ]]; then
  case "$ACCELERATOR" in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "no default runtime for $ACCELERATOR: pass --runtime" ;;
  esac
fi

create=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME"
        --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" ${LOCATION[@]+"${LOCATION[@]}"})
[[ "$SPOT" == 0 ]] || create+=(--spot)
run "${create[@]}"

if [[ "$WAIT" == 1 ]]; then
  describe=(gcloud compute tpus queued-resources describe "$NAME" ${LOCATION[@]+"${LOCATION[@]}"}
            --format='value(state.state)')
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# every 30 s until ACTIVE:"
    run "${describe[@]}"
  else
    while true; do
      state="$("${describe[@]}")"
      echo "$(date +%H:%M:%S) $NAME: $state"
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) die "queued resource $NAME is $state" ;;
      esac
      sleep 30
    done
  fi
fi
