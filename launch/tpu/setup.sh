#!/usr/bin/env bash
# Installs this repository on every worker of a TPU slice: the working tree (tracked files and
# untracked ones git does not ignore, so local edits to configs travel) is packed here, copied
# to all workers, unpacked to ~/valley_jax and installed with its `tpu` extra into a Python 3.11
# virtual environment (~/valley_venv). TPU VM images ship Python 3.10, older than the package
# needs: uv provides 3.11.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu/setup.sh --name=NAME [options]

Copies this working tree to every worker of the slice NAME and installs it there
(~/valley_jax, virtual environment ~/valley_venv, extra `tpu`). Rerun after changing code.

  --name=NAME           TPU name (default: $TPU_NAME)
  --zone=ZONE           default: gcloud's compute/zone
  --project=PROJECT     default: gcloud's core/project
  --extras=LIST         pip extras to install (default: tpu)
  --dry-run             print the commands instead of running them
  -h, --help            this help
EOF
}

EXTRAS="tpu"
UV_VERSION="0.13.9"
wants_help "$@" && { usage; exit 0; }
split_flags "$@"
parse_common
set -- ${REST[@]+"${REST[@]}"}
while (($#)); do
  case "$1" in
    --extras) need_value "$@"; EXTRAS="$2"; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

archive="/tmp/valley_jax-$NAME.tar.gz"
pack="git -C $(shell_quote "$VALLEY_ROOT") ls-files -z --cached --others --exclude-standard"
pack+=" | tar -czf $(shell_quote "$archive") -C $(shell_quote "$VALLEY_ROOT") --null -T -"
run bash -c "$pack"
run gcloud compute tpus tpu-vm scp "$archive" "$NAME:valley_jax.tar.gz" --worker=all \
  ${LOCATION[@]+"${LOCATION[@]}"}

# On each worker. A rerun replaces the code but keeps the environment (and its wheels).
install="set -euo pipefail"
install+=" && rm -rf ~/$REMOTE_REPO && mkdir -p ~/$REMOTE_REPO"
install+=" && tar -xzf ~/valley_jax.tar.gz -C ~/$REMOTE_REPO"
install+=" && python3 -m pip install --user --quiet uv==$UV_VERSION"
install+=" && (test -x ~/$REMOTE_VENV/bin/python || ~/.local/bin/uv venv --python 3.11 ~/$REMOTE_VENV)"
install+=" && ~/.local/bin/uv pip install --python ~/$REMOTE_VENV/bin/python -e \"\$HOME/$REMOTE_REPO[$EXTRAS]\""
# An import check only: touching the TPU here, on every worker at once, would start the runtime.
install+=" && ~/$REMOTE_VENV/bin/python -c 'import jax, valley_jax; print(jax.__version__)'"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all ${LOCATION[@]+"${LOCATION[@]}"} \
  --command="$install"
