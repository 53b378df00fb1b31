#!/usr/bin/env bash
# The offline quality report of the embedded-digits models (docs/guide.md, "Quality on the embedded digits"):
# trains (or resumes) the demo (class-conditional) and its unconditional twin, then measures them with the
# project's digit classifier: the samplers at equal model calls, guidance w, conditional vs unconditional, DDIM
# inversion.
#   bench/digits_report.sh [RUNS_DIR]      (default runs/; about 60 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-runs}"
samples=1000
main() { python main.py "$@"; }
evaluate() { main --mode=eval --config.eval.num_samples=$samples --config.sampling.batch_size=250 "$@"; }

main --config=configs/default.py --workdir="$runs/digits"
main --config=configs/digits_unconditional.py --workdir="$runs/digits_unconditional"
for seed in 1 2; do
  evaluate --config=configs/default.py --workdir="$runs/digits" --config.sampling.seed=$seed
  evaluate --config=configs/digits_unconditional.py --workdir="$runs/digits_unconditional" --config.sampling.seed=$seed
done
for w in 0.5 2.0; do
  evaluate --config=configs/default.py --workdir="$runs/digits" --config.sampling.guidance_scale=$w
done
# The samplers at equal model calls (10, 20, 35, 50): DDIM (eta 1), DPM-Solver++(2M), Euler-ancestral, and Heun
# with n steps making 2n - 1 calls.
for calls in 10 20 35 50; do
  for method in ddim dpm++2m euler_a heun; do
    steps=$calls; eta=1.0
    case $method in dpm++2m) eta=0.0 ;; heun) steps=$(( (calls + 1) / 2 )); eta=0.0 ;; esac
    evaluate --config=configs/default.py --workdir="$runs/digits" --config.sampling.method=$method \
      --config.sampling.num_steps=$steps --config.sampling.eta=$eta
  done
done
main --config=configs/default.py --workdir="$runs/digits" --mode=interpolate
main --config=configs/default.py --workdir="$runs/digits" --mode=compare
main --config=configs/default.py --workdir="$runs/digits" --mode=sample --config.sampling.guidance_scale=2.0

for f in "$runs"/digits/eval/*.json "$runs"/digits_unconditional/eval/*.json \
    "$runs"/digits/samples/interpolate_*/reconstruction.json; do
  echo "== $f"; cat "$f"; echo
done
