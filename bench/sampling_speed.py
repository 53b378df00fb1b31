"""Sampling speed table: DDPM (all T steps) vs DDIM at several step counts, images/s, per config.

  python bench/sampling_speed.py --configs=default,mnist,cifar10 --batch=16 --ddim_steps=10,20,50,100

Each sampler runs once to compile and then --repeats timed batches of --batch images (median).
DDPM with T steps runs in full unless --ddpm_estimate: then its time is estimated as T / 100
times the measured DDIM-100 time (the same model calls, one per step) and marked as an estimate.
Prints a markdown table with the date, machine and command.
"""
import datetime
import importlib
import os
import platform
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results  # pylint: disable=g-import-not-at-top,wrong-import-position  # bench/results.py.

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', ['default', 'mnist', 'cifar10'], 'Config modules under configs/.')
flags.DEFINE_integer('batch', 16, 'Images per sampling batch.')
flags.DEFINE_list('ddim_steps', ['10', '20', '50', '100'], 'DDIM step counts.')
flags.DEFINE_integer('repeats', 1, 'Timed batches per sampler (median).')
flags.DEFINE_bool('ddpm_estimate', False, 'Estimate DDPM from DDIM-100 instead of running all T steps.')
flags.DEFINE_string('out_dir', results.DEFAULT_DIR, "Folder for sampling_speed.md and .json ('' for none).")


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or 'unknown CPU'


def main(argv):
  del argv
  from diffusion_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  base = importlib.import_module('configs.default').get_config()  # CPU devices and scheduler are per process.
  base.training.batch_size = base.sampling.batch_size = FLAGS.batch
  xla_cpu.set_flags(base)
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import experiment, runtime, sampling  # pylint: disable=g-import-not-at-top
  xla_cpu.tune(base)  # Samplers compiled as main.py compiles them.

  mesh = runtime.create_mesh()
  device = f'{jax.devices()[0].device_kind} x {mesh.size}'
  if jax.devices()[0].platform == 'cpu':
    device += f' ({cpu_name()}, {os.cpu_count()} cores)'
  rows, figures = [], []
  for name in FLAGS.configs:
    config = importlib.import_module(f'configs.{name}').get_config()
    config.training.batch_size = config.sampling.batch_size = FLAGS.batch
    exp = experiment.build(config, mesh)
    params = exp.init_params(jax.random.key(0))
    shape = (FLAGS.batch, *exp.image_shape)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    T = config.diffusion.num_timesteps
    samplers = [(f'DDIM-{k}', sampling.Sampler('ddim', int(k), eta=0.0)) for k in FLAGS.ddim_steps]
    if not FLAGS.ddpm_estimate:
      samplers.append((f'DDPM-{T}', sampling.Sampler('ddpm', T)))
    seconds = {}
    for label, sampler in samplers:
      sample_fn = exp.sample_fn(sampler)
      jax.block_until_ready(sample_fn(params, jax.random.key(1), 0))  # Compile.
      times = []
      for i in range(FLAGS.repeats):
        start = time.perf_counter()
        jax.block_until_ready(sample_fn(params, jax.random.key(2 + i), 0))
        times.append(time.perf_counter() - start)
      seconds[label] = statistics.median(times)
      print(f'{name} {label}: {seconds[label]:.2f} s per batch of {FLAGS.batch}', flush=True)
    if FLAGS.ddpm_estimate:
      if 'DDIM-100' not in seconds:
        raise app.UsageError('--ddpm_estimate needs 100 in --ddim_steps.')
      seconds[f'DDPM-{T} (estimated)'] = seconds['DDIM-100'] * T / 100
    for label, s in seconds.items():
      rows.append(f'| {name} ({num_params / 1e6:.2f}M, {shape[1]}x{shape[2]}x{shape[3]}) | {label} | {FLAGS.batch} | '
                  f'{s:.2f} | {FLAGS.batch / s:.2f} |')
      figures.append({'config': name, 'params': num_params, 'sampler': label, 'batch': FLAGS.batch, 'seconds': s})

  header = f'{datetime.date.today()}, {device}; command: python {" ".join(sys.argv)}'
  table = '\n'.join([header, '', '| model | sampler | batch | seconds per batch | images/s |', '|---|---|---|---|---|',
                     *rows])
  print('\n' + table)
  results.write(FLAGS.out_dir, 'sampling_speed', table, {'header': header, 'rows': figures})


if __name__ == '__main__':
  app.run(main)
