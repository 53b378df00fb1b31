"""Runs train_and_evaluate on the tiny test config in its own process (for device and host counts).

  python tests/run_tiny_training.py WORKDIR OUT.npz [NUM_STEPS [GRAD_ACCUM_STEPS]]

Set XLA_FLAGS=--xla_force_host_platform_device_count=N for N simulated devices, and start it
with launch/local.sh for several processes. Process 0 writes the final params and EMA params,
flattened, to OUT.npz.
"""
import os
import sys

import jax
import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]
from configs.tiny import get_config as tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(workdir, out, num_steps='4', grad_accum_steps='1'):
  from diffusion_jax import runtime, train, xla_cpu  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  xla_cpu.set_flags(config)  # As main.py does: the same XLA:CPU kernels, the same bits.
  runtime.initialize()
  config.training.num_train_steps = int(num_steps)
  config.training.grad_accum_steps = int(grad_accum_steps)
  config.sampling.batch_size = 8  # Divisible by up to 8 devices.
  xla_cpu.tune(config)
  state = train.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    flat = {f'{kind}/{jax.tree_util.keystr(path)}': np.asarray(leaf)
            for kind, tree in (('params', state.params), ('ema', state.ema_params))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    np.savez(out, devices=jax.device_count(), processes=jax.process_count(), **flat)


if __name__ == '__main__':
  main(*sys.argv[1:])
