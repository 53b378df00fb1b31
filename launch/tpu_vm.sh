#!/usr/bin/env bash
# Create a Cloud TPU VM (one host or a pod slice), install diffusion_jax on every worker, train, watch, delete.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh COMMAND --name NAME --zone ZONE [options]

Commands:
  create       create the TPU VM (gcloud compute tpus tpu-vm create)
  install      copy this checkout to every worker and pip install it with jax[tpu]
  train        start `python main.py --config=CONFIG --workdir=WORKDIR` on all workers (in the background)
  logs         tail the training log of worker 0
  tensorboard  start TensorBoard on worker 0 and forward it to localhost:6006
  delete       delete the TPU VM

Options:
  --name NAME              TPU VM name (required)
  --zone ZONE              zone, e.g. us-central2-b (required)
  --project PROJECT        Google Cloud project (default: gcloud's)
  --accelerator-type TYPE  e.g. v4-8 (one host) or v4-32 (a pod slice of 4 hosts); default v4-8
  --version VERSION        TPU software version; default tpu-ubuntu2204-base
  --spot                   create a Spot (preemptible) VM; resume by running `train` again
  --config FILE            config file for train (required for train), e.g. configs/cifar10.py
  --workdir DIR            workdir for train and tensorboard (required for both), e.g. gs://BUCKET/runs/cifar10
  --override ARG           extra --config.x=y argument for main.py (repeatable)
  --dry-run                print the commands instead of running them
  -h, --help               this help
USAGE
}

die() { echo "error: $*" >&2; echo "Run with --help for usage." >&2; exit 2; }

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
command="$1"; shift
case "$command" in
  -h|--help) usage; exit 0 ;;
  create|install|train|logs|tensorboard|delete) ;;
  *) die "unknown command '$command'; choose one of create, install, train, logs, tensorboard, delete" ;;
esac

name="" zone="" project="" accelerator="v4-8" version="tpu-ubuntu2204-base" spot=0 config="" workdir="" dry_run=0
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="${2:-}"; shift 2 ;;
    --zone) zone="${2:-}"; shift 2 ;;
    --project) project="${2:-}"; shift 2 ;;
    --accelerator-type) accelerator="${2:-}"; shift 2 ;;
    --version) version="${2:-}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --config) config="${2:-}"; shift 2 ;;
    --workdir) workdir="${2:-}"; shift 2 ;;
    --override) overrides+=("${2:-}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
done
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"

run() {  # Print or run a command given as words.
  if [[ $dry_run -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")
ssh_all=("${gcloud_tpu[@]}" ssh "$name" "${common[@]}" --worker=all --command)
repo_dir=diffusion_jax  # Relative to the remote home folder.

case "$command" in
  create)
    args=("${gcloud_tpu[@]}" create "$name" "${common[@]}" --accelerator-type="$accelerator" --version="$version")
    [[ $spot -eq 1 ]] && args+=(--spot)
    run "${args[@]}"
    ;;
  install)
    root="$(cd "$(dirname "$0")/.." && pwd)"
    run "${gcloud_tpu[@]}" scp --recurse "$root" "$name:$repo_dir" "${common[@]}" --worker=all
    run "${ssh_all[@]}" "cd $repo_dir && pip install -U pip && pip install -e '.[tpu]'"
    ;;
  train)
    [[ -n "$config" ]] || die "--config is required for train"
    [[ -n "$workdir" ]] || die "--workdir is required for train"
    main_args="--config=$config --workdir=$workdir"
    for o in "${overrides[@]+"${overrides[@]}"}"; do main_args+=" $o"; done
    run "${ssh_all[@]}" "cd $repo_dir && nohup python main.py $main_args > train.log 2>&1 &"
    ;;
  logs)
    run "${gcloud_tpu[@]}" ssh "$name" "${common[@]}" --worker=0 --command "tail -f $repo_dir/train.log"
    ;;
  tensorboard)
    [[ -n "$workdir" ]] || die "--workdir is required for tensorboard"
    run "${gcloud_tpu[@]}" ssh "$name" "${common[@]}" --worker=0 --command "tensorboard --logdir $workdir --port 6006" \
      -- -L 6006:localhost:6006
    ;;
  delete)
    run "${gcloud_tpu[@]}" delete "$name" "${common[@]}" --quiet
    ;;
esac
