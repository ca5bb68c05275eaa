# Shared by the TPU scripts (sourced): the options every one of them takes.
source "$(dirname -- "${BASH_SOURCE[0]}")/../lib.sh"

NAME="${TPU_NAME:-}"
ZONE=""
PROJECT=""

# Parses --name/--zone/--project/--dry-run from the array ARGS; what is left is in REST.
# Zone and project default to gcloud's configuration (gcloud config set compute/zone ...).
parse_common() {
  REST=()
  set -- ${ARGS[@]+"${ARGS[@]}"}
  while (($#)); do
    case "$1" in
      --name) need_value "$@"; NAME="$2"; shift ;;
      --zone) need_value "$@"; ZONE="$2"; shift ;;
      --project) need_value "$@"; PROJECT="$2"; shift ;;
      --dry-run) DRY_RUN=1 ;;
      --) REST+=("$@"); break ;;
      *) REST+=("$1") ;;
    esac
    shift
  done
  [[ -n "$NAME" ]] || die "--name is required (or set TPU_NAME)"
  LOCATION=()
  [[ -z "$ZONE" ]] || LOCATION+=("--zone=$ZONE")
  [[ -z "$PROJECT" ]] || LOCATION+=("--project=$PROJECT")
}

# Where setup.sh puts the code and its Python on every worker (relative to the home folder).
REMOTE_REPO="valley_jax"
REMOTE_VENV="valley_venv"
REMOTE_LOG="valley_train.log"  # outside the code folder, which setup.sh replaces
