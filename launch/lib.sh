# Shared by the launch scripts (sourced, never run). Every action goes through `run`, so that
# --dry-run prints exactly the command lines a real run executes, one per line, quoted so that
# each line can be pasted into a shell.

# The repository root, whatever directory a script is started from.
VALLEY_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0

# Arguments as one shell line: plain words as they are, others in single quotes.
shell_quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    shell_quote "$@"
  else
    "$@"
  fi
}

# As run, but the command replaces this shell: signals (a SLURM preemption's SIGTERM, Ctrl-C)
# reach the trainer itself, which checkpoints before it exits.
run_exec() {
  if [[ "$DRY_RUN" == 1 ]]; then
    shell_quote "$@"
  else
    exec "$@"
  fi
}

die() {
  printf '%s: %s\n' "$(basename -- "$0")" "$*" >&2
  exit 2
}

# True when -h or --help comes before a lone `--` (after it, they are training arguments).
wants_help() {
  local arg
  for arg in "$@"; do
    [[ "$arg" == -- ]] && return 1
    [[ "$arg" == -h || "$arg" == --help ]] && return 0
  done
  return 1
}

# Splits `--flag=value` into `--flag value` (up to a lone `--`, after which the training
# arguments pass through untouched); the result is in the array ARGS.
split_flags() {
  ARGS=()
  while (($#)); do
    case "$1" in
      --) ARGS+=("$@"); return ;;
      --*=*) ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# The value of a flag that takes one: fails with a usage error when it is missing.
need_value() {
  [[ $# -ge 2 && "$2" != --* ]] || die "$1 needs a value (see --help)"
}
