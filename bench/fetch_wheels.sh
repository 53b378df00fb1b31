#!/usr/bin/env bash
# Downloads the pure-Python packages that bench/speed_card.py needs beyond JAX, flax, optax, orbax-checkpoint,
# torch and numpy, as wheels into .whl/ (ignored by git), for a GPU or TPU machine without a network:
#   bench/fetch_wheels.sh            # here, with a network (Python 3.12 wheels by default: PYTHON_VERSION=3.11 ...)
#   bench/speed_card_offline.sh      # there, from the repository root: installs .whl/ into /tmp/site and runs the card
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  ml-collections==1.1.0 clu==0.0.12 diffusers==0.42.1 importlib-metadata==10.2.0 importlib-resources==7.1.0 \
  mlxtend==0.25.0
ls -1 .whl
