#!/usr/bin/env bash
# Issue #6's measurement: the README's main-job line (quickstart, first line) exactly, timed from
# a fresh install. A clean clone of this repository's HEAD, a new virtual environment, no pip
# cache (pip fetches and installs every package) and, with --remove-tcmalloc, Debian's
# libtcmalloc-minimal4 removed first so that the line's apt step installs it again.
#
#     bash bench/readme_line.sh [--remove-tcmalloc] [SCRATCH_DIR]
#
# The line writes /tmp/valley_demo (removed first). Prints the whole line's seconds and its
# answers; the log (with the trainer's timestamps per phase) is SCRATCH_DIR/line.log.
# BENCHMARKS.md, "CPU demo", session 25 ran it as a scratch script with --remove-tcmalloc.
set -euo pipefail
remove_tcmalloc=0
if [[ "${1:-}" == "--remove-tcmalloc" ]]; then remove_tcmalloc=1; shift; fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
scratch="${1:-/tmp/valley_readme_line}"
rm -rf "$scratch" /tmp/valley_demo
mkdir -p "$scratch"
git clone -q "$repo" "$scratch/clone"
if (( remove_tcmalloc )); then
  apt-get remove -y -q libtcmalloc-minimal4 > "$scratch/apt_remove.log" 2>&1
fi
python3 -m venv "$scratch/venv"
# shellcheck disable=SC1091
source "$scratch/venv/bin/activate"
cd "$scratch/clone"
export PIP_NO_CACHE_DIR=1
line=$(sed -n '/^## Quickstart/,/^```$/p' README.md | grep -m1 "valley_jax.train")
echo "$line" > "$scratch/line.txt"
start=$(date +%s)
rc=0
bash -c "$line" > "$scratch/line.log" 2>&1 || rc=$?
end=$(date +%s)
echo "README line: rc $rc, $((end - start)) s"
grep -E "^  [a-z_]+ +[0-9.]+ +n=" "$scratch/line.log" | head -7 || true
exit "$rc"
