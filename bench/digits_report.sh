#!/usr/bin/env bash
# The offline quality report of the embedded-digits models (README "Quality on the embedded digits"):
# trains (or resumes) the unconditional demo and the class-conditional model, then measures them with the
# project's digit classifier: the samplers at equal model calls, guidance w=0 vs w>0, DDIM inversion.
#   bench/digits_report.sh [RUNS_DIR]      (default runs/; about 25 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-runs}"
samples=1000
main() { python main.py "$@"; }

main --config=configs/default.py --workdir="$runs/digits"
# The samplers at equal model calls (10, 20, 35, 50): DDIM (eta 1), DPM-Solver++(2M), Euler-ancestral, and Heun
# with n steps making 2n - 1 calls.
for calls in 10 20 35 50; do
  for method in ddim dpm++2m euler_a heun; do
    steps=$calls; eta=1.0
    case $method in dpm++2m) eta=0.0 ;; heun) steps=$(( (calls + 1) / 2 )); eta=0.0 ;; esac
    main --config=configs/default.py --workdir="$runs/digits" --mode=eval --config.eval.num_samples=$samples \
      --config.sampling.method=$method --config.sampling.num_steps=$steps --config.sampling.eta=$eta \
      --config.sampling.batch_size=250
  done
done
main --config=configs/default.py --workdir="$runs/digits" --mode=eval --config.eval.num_samples=$samples \
  --config.sampling.batch_size=250
main --config=configs/default.py --workdir="$runs/digits" --mode=interpolate
main --config=configs/default.py --workdir="$runs/digits" --mode=compare

main --config=configs/digits_conditional.py --workdir="$runs/digits_conditional" \
  --config.training.num_train_steps=1500
for w in 0.0 2.0; do
  main --config=configs/digits_conditional.py --workdir="$runs/digits_conditional" --mode=eval \
    --config.eval.num_samples=$samples --config.sampling.guidance_scale=$w --config.sampling.num_steps=50
done
main --config=configs/digits_conditional.py --workdir="$runs/digits_conditional" --mode=sample \
  --config.sampling.num_steps=50

for f in "$runs"/digits/eval/*.json "$runs"/digits_conditional/eval/*.json "$runs"/digits/samples/interpolate_*/reconstruction.json; do
  echo "== $f"; cat "$f"; echo
done
