#!/usr/bin/env bash
# Submit a multi-node GPU training job to SLURM: one process per node, all of the node's GPUs each.
# jax.distributed.initialize() reads the SLURM environment (coordinator, process count and id).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm.sh --nodes N --gpus-per-node G --config FILE --workdir DIR [options]

  --nodes N            nodes (required)
  --gpus-per-node G    GPUs per node (required)
  --config FILE        config file (required), e.g. configs/cifar10.py
  --workdir DIR        shared workdir (required): a path every node sees, or gs://...
  --partition P        SLURM partition (optional)
  --time HH:MM:SS      time limit (default 24:00:00); a requeued job resumes from the workdir
  --venv DIR           virtual environment to activate on each node (default .venv)
  --override ARG       extra --config.x=y argument for main.py (repeatable)
  --dry-run            print the batch script instead of submitting it
USAGE
}

die() { echo "error: $*" >&2; echo "Run with --help for usage." >&2; exit 2; }

nodes="" gpus="" config="" workdir="" partition="" time_limit="24:00:00" venv=".venv" dry_run=0
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="${2:-}"; shift 2 ;;
    --gpus-per-node) gpus="${2:-}"; shift 2 ;;
    --config) config="${2:-}"; shift 2 ;;
    --workdir) workdir="${2:-}"; shift 2 ;;
    --partition) partition="${2:-}"; shift 2 ;;
    --time) time_limit="${2:-}"; shift 2 ;;
    --venv) venv="${2:-}"; shift 2 ;;
    --override) overrides+=("${2:-}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
done
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer"
[[ -n "$config" ]] || die "--config is required"
[[ -n "$workdir" ]] || die "--workdir is required"

main_args="--config=$config --workdir=$workdir"
for o in "${overrides[@]+"${overrides[@]}"}"; do main_args+=" $o"; done
root="$(cd "$(dirname "$0")/.." && pwd)"

script="#!/usr/bin/env bash
#SBATCH --job-name=diffusion_jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --requeue
#SBATCH --signal=TERM@120
${partition:+#SBATCH --partition=$partition
}#SBATCH --output=%x-%j.out
cd $root
source $venv/bin/activate
srun python main.py $main_args
"
if [[ $dry_run -eq 1 ]]; then
  printf '%s' "$script"
else
  printf '%s' "$script" | sbatch
fi
