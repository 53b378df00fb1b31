"""Runs main.py with one injected fault, for tests/test_faults.py.

  python tests/run_main_with_fault.py FAULT MAIN_FLAGS...

FAULT:
  none        no fault;
  nan_at_N    the loss becomes NaN from step N on;
  slow_npz    samples.npz is written in two halves with a pause between them (prints WRITING at the pause);
  slow_save   every checkpoint save prints SAVING <step> as it starts, and orbax's save of each item (params,
              EMA params, optimizer state) is held back 0.5 s: a signal then arrives during the save call.
"""
import os
import sys
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS)]

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
import main  # pylint: disable=g-import-not-at-top,wrong-import-position


def inject(fault: str) -> None:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from diffusion_jax import checkpoints, train  # pylint: disable=g-import-not-at-top
  if fault.startswith('nan_at_'):
    first, real = int(fault[len('nan_at_'):]), train.TrainStep.__call__

    def poisoned(self, state, batch, rng):
      state, metrics = real(self, state, batch, rng)
      return state, dict(metrics, loss=jnp.where(state.step >= first, jnp.nan, metrics['loss']))
    train.TrainStep.__call__ = poisoned
  elif fault == 'slow_npz':
    savez = np.savez_compressed

    def slow_savez(file, **arrays):
      savez(file, **arrays)
      size = file.tell()
      file.truncate(size // 2)  # Half of the archive is on disk ...
      file.flush()
      print('WRITING', flush=True)
      time.sleep(60)  # ... when the test kills the process.
    np.savez_compressed = slow_savez
  elif fault == 'slow_save':
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    handler_save, save = ocp.StandardCheckpointHandler.async_save, checkpoints.save

    async def slow_async_save(self, *args, **kwargs):
      time.sleep(0.5)
      return await handler_save(self, *args, **kwargs)

    def announced_save(manager, state):
      print(f'SAVING {int(state.step)}', flush=True)
      save(manager, state)
    ocp.StandardCheckpointHandler.async_save = slow_async_save
    checkpoints.save = announced_save
  elif fault != 'none':
    raise SystemExit(f'unknown fault {fault}')


if __name__ == '__main__':
  inject(sys.argv[1])
  sys.argv = ['main.py', *sys.argv[2:]]
  app.run(main.main, flags_parser=main.parse_flags)
