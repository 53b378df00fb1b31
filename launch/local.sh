#!/usr/bin/env bash
# Run N processes of one training job on this machine (127.0.0.1), joined by jax.distributed.initialize().
# Each process gets DIFFUSION_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID; process 0's output is shown,
# the others go to WORKDIR/process_<i>.log.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local.sh --num-processes N [--port PORT] [--devices-per-process D] [--dry-run] -- COMMAND...

  --num-processes N          processes to start (required, >= 1)
  --port PORT                coordinator port on 127.0.0.1 (default 12355)
  --devices-per-process D    simulated CPU devices per process (XLA_FLAGS); default: leave as is
  --log-dir DIR              where processes 1..N-1 write their logs (default: current folder)
  --dry-run                  print the commands instead of running them
  COMMAND                    e.g. python main.py --config=configs/default.py --workdir=runs/two
USAGE
}

die() { echo "error: $*" >&2; echo "Run with --help for usage." >&2; exit 2; }

num="" port=12355 devices="" log_dir="." dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-processes) num="${2:-}"; shift 2 ;;
    --port) port="${2:-}"; shift 2 ;;
    --devices-per-process) devices="${2:-}"; shift 2 ;;
    --log-dir) log_dir="${2:-}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (put the command after --)" ;;
  esac
done
[[ "$num" =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '${num}'"
[[ $# -gt 0 ]] || die "no command given after --"

pids=()
for ((i = num - 1; i >= 0; i--)); do
  env_args=("DIFFUSION_JAX_COORDINATOR=127.0.0.1:$port" "DIFFUSION_JAX_NUM_PROCESSES=$num" "DIFFUSION_JAX_PROCESS_ID=$i")
  [[ -n "$devices" ]] && env_args+=("XLA_FLAGS=--xla_force_host_platform_device_count=$devices")
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' env "${env_args[@]}" "$@"; echo
  elif [[ $i -eq 0 ]]; then
    env "${env_args[@]}" "$@" &
    pids+=($!)
  else
    env "${env_args[@]}" "$@" > "$log_dir/process_$i.log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]+"${pids[@]}"}"; do
  wait "$pid" || status=$?
done
exit "$status"
