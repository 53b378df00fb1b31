"""Trains or samples a diffusion model.

  python main.py --config=configs/default.py --workdir=runs/digits
  python main.py --config=configs/cifar10.py --workdir=DIR --config.training.batch_size=256
  python main.py --config=configs/default.py --workdir=runs/digits --mode=sample
  python main.py --config=configs/default.py --workdir=runs/digits --mode=compare
  python main.py --config=configs/default.py --workdir=runs/digits --mode=eval
"""
import os

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
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # TensorFlow only feeds data; JAX owns the accelerators.
  from diffusion_jax import distributed, evaluate, sample, train  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  try:
    distributed.configure_cpu_devices(config.num_cpu_devices,
                                      (config.training.batch_size, config.sampling.batch_size), config.cpu_scheduler)
    distributed.enable_compilation_cache(config.compilation_cache_dir)
    distributed.initialize()
    logging.info('Config:\n%s', FLAGS.config)
    modes = {'train': train.train_and_evaluate, 'sample': sample.sample_from_workdir,
             'compare': sample.compare_from_workdir, 'interpolate': sample.interpolate_from_workdir,
             'eval': evaluate.evaluate,
             'reference_stats': evaluate.compute_reference_stats}
    modes[FLAGS.mode](FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == '__main__':
  app.run(main)
