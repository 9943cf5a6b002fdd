#!/usr/bin/env bash
# N JAX processes on this machine (127.0.0.1), each with K emulated CPU devices and gloo collectives: a real
# multi-process run, the same code path as a TPU pod or GPU cluster, on one laptop. The tests use it.
#
#   launch/local.sh 2 --config=configs/quickstart.py --workdir=runs/mp      # 2 processes x 4 devices
#   launch/local.sh 2 --module=vit_jax.tools.check_distributed               # smoke test: psum over 8 devices
#
# Process i gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, which vit_jax.distributed.initialize
# reads (equivalent to --coordinator_address/--num_processes/--process_id). Process 0 writes to this terminal,
# process i > 0 to LOG_DIR/process_i.log. SIGINT and SIGTERM (SIGHUP as SIGTERM) go to every process, and the
# script waits for them: the trainer saves a checkpoint, then exits with 130 after SIGINT, 0 after SIGTERM. When
# one process fails the others get SIGTERM and are waited for too. The exit status is that of the first process
# that failed, else 0.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'EOF'
usage: launch/local.sh N [options] [--] [ARGS...]
  N                          number of processes (>= 1)
  --devices_per_process=K    emulated CPU devices per process (default 4)
  --port=P                   coordinator port on 127.0.0.1 (default: a free port)
  --module=M                 python module to run (default vit_jax.main); ARGS are passed to it
  --log_dir=DIR              logs of processes 1..N-1 (default: a new temporary directory)
  --dry-run                  print the commands, run nothing
environment: PYTHON (default: this repository's .venv/bin/python if there is one, else python3)
EOF
  exit 2
}

[[ $# -ge 1 ]] || usage
num_processes=$1
shift
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || { echo "error: N must be a positive integer, got '$num_processes'" >&2; usage; }

devices_per_process=4
port=""
module=vit_jax.main
log_dir=""
dry_run=false
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --devices_per_process=*) devices_per_process=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --module=*) module=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --dry-run) dry_run=true ;;
    -h|--help) usage ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
[[ $devices_per_process =~ ^[1-9][0-9]*$ ]] || { echo "error: --devices_per_process must be a positive integer" >&2; exit 2; }
python=$(default_python)

if [[ -z $port ]]; then
  if $dry_run; then
    port=PORT  # a real run picks a free one
  else
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
fi
if [[ -z $log_dir ]]; then
  if $dry_run; then log_dir=LOG_DIR; else log_dir=$(mktemp -d -t vit_jax_local.XXXXXX); fi
fi

# The command of process $1, one word per array element.
command_of() {
  # The caller's XLA flags are kept; the device count comes last, so it wins over one of theirs.
  local device_flag="--xla_force_host_platform_device_count=$devices_per_process"
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }$device_flag"
       "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$num_processes" "JAX_PROCESS_ID=$1"
       "$python" -m "$module" "${args[@]}")
}

if $dry_run; then
  for ((i = 0; i < num_processes; i++)); do
    command_of "$i"
    if ((i > 0)); then
      echo "$(print_command "${cmd[@]}") > $(print_command "$log_dir/process_$i.log") 2>&1 &"
    else
      echo "$(print_command "${cmd[@]}") &"
    fi
  done
  echo wait
  exit 0
fi

mkdir -p "$log_dir"
pids=()
declare -A index_of  # running pid -> process index
stopping=false
forward() {  # sends signal $1 to every running process; from now on their exits are waited for, not stopped
  stopping=true
  local pid
  for pid in "${!index_of[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'forward INT' INT
trap 'forward TERM' TERM HUP

# Job control while starting them gives each process a process group of its own: a Ctrl-C in the terminal reaches
# this script alone, which forwards it once (a second one is the trainer's "exit now"), and the processes do not
# inherit the SIGINT that a script's background jobs otherwise ignore.
set -m
for ((i = 0; i < num_processes; i++)); do
  command_of "$i"
  if ((i > 0)); then "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 & else "${cmd[@]}" & fi
  pids+=("$!")
  index_of[$!]=$i
done
set +m
if ((num_processes > 1)); then echo "local.sh: logs of processes 1..$((num_processes - 1)) in $log_dir" >&2; fi

# Polls rather than `wait -n`, which misses a process that ended before it was called.
status=0
while ((${#index_of[@]} > 0)); do
  exited=()
  for pid in "${!index_of[@]}"; do kill -0 "$pid" 2>/dev/null || exited+=("$pid"); done
  if ((${#exited[@]} == 0)); then sleep 0.2; continue; fi
  for pid in "${exited[@]}"; do
    [[ -n ${index_of[$pid]:-} ]] || continue  # already collected below, as process 0
    code=0
    wait "$pid" || code=$?
    i=${index_of[$pid]}
    unset "index_of[$pid]"
    if ((code == 0 || status != 0)); then continue; fi
    status=$code
    if $stopping; then continue; fi
    pid0=${pids[0]}
    if ((i > 0)) && [[ -n ${index_of[$pid0]:-} ]]; then
      # A bad config fails every process at once: give process 0 a moment (it stays up to one peer poll, 5 s,
      # after its error so the others read it), so its error line (on this terminal) is the one reported.
      for _ in $(seq 30); do kill -0 "$pid0" 2>/dev/null || break; sleep 0.5; done
      if ! kill -0 "$pid0" 2>/dev/null; then
        code=0
        wait "$pid0" || code=$?
        unset "index_of[$pid0]"
        if ((code != 0)); then status=$code; i=0; fi
      fi
    fi
    if ((i > 0)); then
      echo "local.sh: process $i exited with status $status; last lines of $log_dir/process_$i.log:" >&2
      tail -n 5 "$log_dir/process_$i.log" >&2
    fi
    # The others stop too: blocked in a collective with the lost process, they end within their heartbeat.
    forward TERM
  done
done
exit "$status"
