#!/usr/bin/env bash
# Starts N processes of `python -m cal_jax.main` on this machine, each on its own fake CPU
# devices, joined by JAX's multi-controller runtime through a loopback coordinator. The tests
# exercise the multi-host path this way; it is also a dry rehearsal of a pod or cluster run.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] -- CAL_JAX_MAIN_ARGS...

Starts N processes of `python -m cal_jax.main CAL_JAX_MAIN_ARGS` on this machine, on CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=D), joined through a coordinator on
127.0.0.1. Each process gets the same arguments plus --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I. The script waits for all of them; if one fails, it stops
the others and exits with the failing status. Ctrl-C stops them all.

Options:
  -n, --num_processes N        processes (default 2)
  -d, --devices_per_process D  CPU devices per process (default 2)
  -p, --port PORT              coordinator port on 127.0.0.1 (default: a free one)
  -l, --log_dir DIR            each process writes DIR/process_I.log (default: a new
                               temporary folder); process 0's log is also shown here
  -t, --timeout SECONDS        stop every process after SECONDS (default: no limit)
  -q, --quiet                  do not show process 0's log here
      --dry-run                print the commands, start nothing
  -h, --help                   this text

Environment: PYTHON, the interpreter (default python3).

Example (2 processes x 2 devices, the global batch over 4 devices):
  launch/local.sh -n 2 -d 2 -- --config configs/tiny.py --workdir /tmp/cal_2x2
EOF
}

num_processes=2
devices=2
port=""
log_dir=""
timeout_s=""
quiet=0
dry_run=0
python=${PYTHON:-python3}

while (($#)); do
  case $1 in
    -n | --num_processes) num_processes=$2; shift 2 ;;
    -d | --devices_per_process) devices=$2; shift 2 ;;
    -p | --port) port=$2; shift 2 ;;
    -l | --log_dir) log_dir=$2; shift 2 ;;
    -t | --timeout) timeout_s=$2; shift 2 ;;
    -q | --quiet) quiet=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (arguments for cal_jax.main go after --)" >&2
       usage >&2; exit 2 ;;
  esac
done
main_args=("$@")

for value in "$num_processes" "$devices" ${timeout_s:+"$timeout_s"} ${port:+"$port"}; do
  if ! [[ $value =~ ^[1-9][0-9]*$ ]]; then
    echo "local.sh: expected a positive integer, got '$value'" >&2
    exit 2
  fi
done

if [[ -z $port ]]; then
  if ((dry_run)); then
    port=PORT
  else
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    if ! [[ $port =~ ^[1-9][0-9]*$ ]]; then
      echo "local.sh: could not pick a free port with $python; give one with --port" >&2
      exit 2
    fi
  fi
fi
if [[ -z $log_dir ]]; then
  if ((dry_run)); then log_dir=LOG_DIR; else log_dir=$(mktemp -d -t cal_jax_local.XXXXXX); fi
fi
xla_flags="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"

command_of() {  # the command of process $1, as an array in `cmd`
  cmd=()
  if [[ -n $timeout_s ]]; then cmd+=(timeout --kill-after=10 "$timeout_s"); fi
  cmd+=("$python" -m cal_jax.main --coordinator_address="127.0.0.1:$port"
        --num_processes="$num_processes" --process_id="$1" "${main_args[@]}")
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    command_of "$i"
    printf 'JAX_PLATFORMS=cpu XLA_FLAGS=%q' "${xla_flags# }"
    printf ' %q' "${cmd[@]}"
    printf ' > %q 2>&1 &\n' "$log_dir/process_$i.log"
  done
  exit 0
fi

mkdir -p "$log_dir"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
trap stop_all EXIT

echo "local.sh: $num_processes processes x $devices CPU devices, coordinator 127.0.0.1:$port," \
     "logs in $log_dir" >&2
for ((i = 0; i < num_processes; i++)); do
  command_of "$i"
  JAX_PLATFORMS=cpu XLA_FLAGS="${xla_flags# }" "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
if ((!quiet)); then
  tail -n +1 -f --pid="${pids[0]}" "$log_dir/process_0.log" &
fi

status=0
running=("${pids[@]}")
while ((${#running[@]})) && ((status == 0)); do
  sleep 1
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    if wait "$pid"; then :; else status=$?; fi
  done
  running=("${still[@]}")
done
if ((status)); then
  echo "local.sh: a process exited with status $status; stopping the others" >&2
  stop_all
  for ((j = 0; j < num_processes; j++)); do
    echo "---- last lines of $log_dir/process_$j.log" >&2
    tail -n 15 "$log_dir/process_$j.log" >&2 || true
  done
fi
wait || true
exit "$status"
