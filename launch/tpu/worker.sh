#!/usr/bin/env bash
# Runs on one TPU worker (launch/tpu/run.sh starts it on all of them at once): describes the
# slice to the trainer and starts training in the background, so that it outlives the ssh
# session; its output goes to ~/valley_train.log.
#
# On a multi-worker slice every worker gets JAX_COORDINATOR_ADDRESS (worker 0, port 8476),
# JAX_NUM_PROCESSES and JAX_PROCESS_ID, read from the VM's metadata: the trainer's
# maybe_initialize_distributed joins them into one JAX run. A single-worker slice needs none.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu/worker.sh [options] -- TRAIN_ARGS     (on a TPU worker, from ~/valley_jax)
       launch/tpu/worker.sh --stop

Starts `python -m valley_jax.train TRAIN_ARGS` in the background on this worker.

  --env=KEY=VALUE   extra environment for the trainer (repeatable), e.g. LIBTPU_INIT_ARGS=...
  --python=PATH     default: ~/valley_venv/bin/python
  --log=FILE        default: ~/valley_train.log
  --port=PORT       coordinator port on worker 0 (default 8476)
  --stop            send SIGTERM to the training started here: it checkpoints and exits
  --dry-run         print the commands instead of running them
  -h, --help        this help

Metadata come from $VALLEY_TPU_METADATA (default: the GCE metadata server's instance
attributes; a file:// folder with agent-worker-number and worker-network-endpoints works too).
EOF
}

PYTHON="$HOME/$REMOTE_VENV/bin/python"
LOG="$HOME/$REMOTE_LOG"
PIDFILE="$HOME/valley_train.pid"
PORT=8476
STOP=0
EXTRA_ENV=()
METADATA="${VALLEY_TPU_METADATA:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}"

split_flags "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --env) need_value "$@"; EXTRA_ENV+=("$2"); shift ;;
    --python) need_value "$@"; PYTHON="$2"; shift ;;
    --log) need_value "$@"; LOG="$2"; shift ;;
    --port) need_value "$@"; PORT="$2"; shift ;;
    --stop) STOP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument $1 (training arguments go after --; see --help)" ;;
  esac
  shift
done

# The pid of the training started here, if it still runs (an exited one not yet reaped, a
# zombie, does not count).
running_pid() {
  local pid
  [[ -f "$PIDFILE" ]] || return 1
  pid="$(cat "$PIDFILE")"
  [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" == [^Z]* ]] || return 1
  echo "$pid"
}

if [[ "$STOP" == 1 ]]; then
  pid="$(running_pid)" || { echo "no training running on this worker"; exit 0; }
  run kill -TERM "$pid"
  exit 0
fi
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "no training arguments: -- --config=... --workdir=..."
if pid="$(running_pid)"; then
  die "training already runs here (pid $pid): stop it first with --stop"
fi

metadata() {
  curl --silent --fail --show-error -H 'Metadata-Flavor: Google' "$METADATA/$1"
}

# worker-network-endpoints: one entry per worker, either a host name or name:id:address.
endpoints="$(metadata worker-network-endpoints)"
worker_id="$(metadata agent-worker-number)"
IFS=',' read -r -a workers <<< "$endpoints"
env_vars=()
if [[ ${#workers[@]} -gt 1 ]]; then
  first="${workers[0]##*:}"
  env_vars+=("JAX_COORDINATOR_ADDRESS=$first:$PORT" "JAX_NUM_PROCESSES=${#workers[@]}"
             "JAX_PROCESS_ID=$worker_id")
fi
env_vars+=(${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"})

cd "$VALLEY_ROOT"  # config paths in TRAIN_ARGS are relative to the repository
command=(env ${env_vars[@]+"${env_vars[@]}"} "$PYTHON" -m valley_jax.train "${TRAIN_ARGS[@]}")
# Detached from the ssh session's terminal and input, so that the session can end.
if [[ "$DRY_RUN" == 1 ]]; then
  echo "nohup $(shell_quote "${command[@]}") < /dev/null > $(shell_quote "$LOG") 2>&1 &"
else
  nohup "${command[@]}" < /dev/null > "$LOG" 2>&1 &
  echo "$!" > "$PIDFILE"
  echo "worker $worker_id of ${#workers[@]}: training started (pid $!), log $LOG"
fi
