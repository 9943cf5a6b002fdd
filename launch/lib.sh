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
