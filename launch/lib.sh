# shellcheck shell=bash
# Shared by the launchers (sourced, not run).

# Prints a command with each word shell-quoted only where needed: a line a reader can paste into a shell.
print_command() {
  local word out=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+=("$word"); else out+=("'${word//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

# Runs a command, or only prints it when dry_run=true (set by the caller).
run() {
  # shellcheck disable=SC2154  # dry_run is the caller's
  if $dry_run; then print_command "$@"; else "$@"; fi
}

# The interpreter to run: $PYTHON, else the repository's own .venv (which `make train` and `make test` create),
# else python3.
default_python() {
  local venv
  venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python"
  if [[ -n ${PYTHON:-} ]]; then
    echo "$PYTHON"
  elif [[ -x $venv ]]; then
    echo "$venv"
  else
    echo python3
  fi
}
