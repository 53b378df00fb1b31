#!/usr/bin/env bash
# The speed card on a machine without a network (e.g. a GPU box with JAX, flax, optax, orbax-checkpoint, torch and
# numpy): installs the wheels that bench/fetch_wheels.sh put in .whl/ into /tmp/site, then runs bench/speed_card.py
# with the given flags (default --out_dir: bench/results).
#   bench/speed_card_offline.sh [--out_dir=DIR] [speed_card.py flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
python3 bench/speed_card.py "$@"
