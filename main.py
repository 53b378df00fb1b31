"""Trains or samples a diffusion model.

  python main.py --config=configs/default.py --workdir=runs/digits
  python main.py --config=configs/cifar10.py --workdir=DIR --config.training.batch_size=256
  python main.py --config=configs/default.py --workdir=runs/digits --mode=sample
  python main.py --config=configs/default.py --workdir=runs/digits --mode=compare
  python main.py --config=configs/default.py --workdir=runs/digits --mode=eval
"""
import difflib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and samples (a local path or gs://).')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'compare', 'interpolate', 'eval', 'reference_stats'],
                  'train: train (and resume); sample: sample a checkpoint; compare: DDPM vs DDIM vs EMA picture; '
                  'interpolate: DDIM inversion and interpolation of two images; eval: FID/IS or digit metrics '
                  '(and bits/dim); reference_stats: FID statistics of the dataset.')
flags.mark_flags_as_required(['config', 'workdir'])


class QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of orbax (several lines per checkpoint); keeps its warnings, without tracebacks
  (a failed write is reported once, by the project's error)."""

  def filter(self, record):
    if '/orbax/' not in record.pathname:
      return True
    record.exc_info = record.exc_text = None
    # The reading modes open checkpoints read-only on purpose; orbax warns about it each time.
    return record.levelno >= logging.logging.WARNING and not record.getMessage().startswith('Given directory is read')


def config_file(argv: list[str]) -> str | None:
  """The path of the last --config=PATH or --config PATH of argv (absl's flags: the last one counts), without
  the ':ARGS' a config file may take."""
  paths = [a.split('=', 1)[1] if a.startswith('--config=') else b
           for a, b in zip(argv, argv[1:] + ['']) if a.startswith('--config=') or a == '--config']
  return paths[-1].split(':', 1)[0] if paths else None


def unknown_config_key(argv: list[str]) -> str | None:
  """The first --config.KEY=... of argv that names no field of the config file, with the closest fields."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  path = config_file(argv)
  if path is None or not os.path.isfile(path):
    return None
  try:  # Only to name the key: a config file that fails here fails the same way for absl, with its traceback.
    config = config_flags.config_flags._LoadConfigModule('config_keys', path).get_config()  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    node = config
    for name in arg[len('--config.'):].split('=', 1)[0].split('.'):
      if not isinstance(node, config_dict.ConfigDict):
        return f'{arg.split("=", 1)[0]}: {name!r} is below a field that is not a group of fields.'
      if name not in node:
        keys = list(node.keys())
        close = difflib.get_close_matches(name, keys, n=3)
        hint = f'; did you mean {" or ".join(close)}?' if close else f'; the keys there are {", ".join(keys)}.'
        return f'{arg.split("=", 1)[0]}: the config has no field {name!r}{hint}'
      node = node[name]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; an unreadable config file, an unknown --config.* key or a bad value end in one line."""
  try:
    remaining = FLAGS(argv)
    getattr(FLAGS.config, 'seed', None)  # A config file that did not load raises its OSError at first use.
    return remaining
  except flags.Error as e:
    sys.exit(f'main.py: {e}')
  except (KeyError, AttributeError, OSError) as e:
    path = config_file(argv) or ''
    if isinstance(e, OSError) and not os.access(path, os.R_OK):
      sys.exit(f'main.py: cannot read the config file --config={path}: '
               f'{"no such file" if not os.path.exists(path) else "permission denied"}.')
    message = unknown_config_key(argv)
    if message is None:
      raise  # An error inside the config file itself: its traceback shows where.
    sys.exit(f'main.py: {message}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(QuietLibraries())
  from diffusion_jax import evaluate, runtime, sample, train, xla_cpu  # pylint: disable=g-import-not-at-top
  from diffusion_jax.checks import ProjectError  # pylint: disable=g-import-not-at-top
  modes = {'train': train.train_and_evaluate, 'sample': sample.sample_from_workdir,
           'compare': sample.compare_from_workdir, 'interpolate': sample.interpolate_from_workdir,
           'eval': evaluate.evaluate, 'reference_stats': evaluate.compute_reference_stats}
  config = FLAGS.config
  try:
    xla_cpu.set_flags(config)  # XLA:CPU's flags and devices, before JAX starts (they do nothing on accelerators).
    runtime.initialize()
    runtime.enable_compilation_cache(config.compilation_cache_dir)
    xla_cpu.tune(config)  # On the CPU backend only.
    runtime.log_devices()
    logging.info('Config:\n%s', config)
    modes[FLAGS.mode](config, FLAGS.workdir)
  except ProjectError as e:  # The project's own: one line. Any other error keeps its traceback.
    sys.exit(f'main.py: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
