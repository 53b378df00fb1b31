"""Trains or samples a diffusion model.

  python main.py --config=configs/default.py --workdir=runs/digits
  python main.py --config=configs/cifar10.py --workdir=DIR --config.training.batch_size=256
  python main.py --config=configs/default.py --workdir=runs/digits --mode=sample
  python main.py --config=configs/default.py --workdir=runs/digits --mode=compare
  python main.py --config=configs/default.py --workdir=runs/digits --mode=eval
"""
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
  """Drops the INFO chatter of orbax (several lines per checkpoint); keeps its warnings."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(QuietLibraries())
  from diffusion_jax import evaluate, runtime, sample, train, xla_cpu  # pylint: disable=g-import-not-at-top
  from diffusion_jax.checks import ConfigError  # pylint: disable=g-import-not-at-top
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
  except ConfigError as e:  # The project's own: one line. Any other error keeps its traceback.
    sys.exit(f'main.py: {e}')


if __name__ == '__main__':
  app.run(main)
