#!/usr/bin/env bash
# Deletes a TPU slice: the queued resource and, with --force, its node (billing stops). The
# shared workdir (checkpoints, model) is untouched.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: launch/tpu/delete.sh --name=NAME [--zone=ZONE] [--project=PROJECT] [--dry-run]

Deletes the queued resource NAME and its TPU VMs, without asking.
EOF_USAGE
}

wants_help "$@" && { usage; exit 0; }
split_flags "$@"
parse_common
[[ ${#REST[@]} -eq 0 ]] || die "unknown argument ${REST[0]} (see --help)"
run gcloud compute tpus queued-resources delete "$NAME" ${LOCATION[@]+"${LOCATION[@]}"} --force --quiet
