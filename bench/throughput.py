"""Train-step and sampling throughput of a config: steps/s, images/s and achieved FLOP/s.

  python bench/throughput.py --config=configs/default.py
  python bench/throughput.py --config=configs/cifar10.py --config.training.batch_size=16 --steps=5

Prints the median over --steps timed calls after one warm-up call (compilation excluded).
"""
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/default.py', 'The config to measure.', lock_config=True)
flags.DEFINE_integer('steps', 10, 'Timed calls per measurement.')
flags.DEFINE_integer('sample_steps', 50, 'DDIM steps for the sampling measurement (0: skip).')


def median_seconds(fn, steps):
  fn()  # Warm-up: compiles.
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  config = FLAGS.config
  from diffusion_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.configure_cpu_devices(config.num_cpu_devices, (config.training.batch_size, config.sampling.batch_size))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from diffusion_jax import sampling, train  # pylint: disable=g-import-not-at-top
  from diffusion_jax.models.unet import unet_from_config  # pylint: disable=g-import-not-at-top
  from diffusion_jax.schedules import schedule_from_config  # pylint: disable=g-import-not-at-top

  mesh = train.create_mesh()
  train.check_config(config, mesh.size)
  model, tx = unet_from_config(config.model), train.create_optimizer(config.optim)
  schedule = schedule_from_config(config.diffusion)
  state = jax.jit(lambda k: train.create_train_state(config, model, tx, k),
                  out_shardings=NamedSharding(mesh, P()))(jax.random.key(0))
  batch_size, size, channels = config.training.batch_size, config.data.image_size, config.data.channels
  batch = train.shard_batch({'image': np.zeros((batch_size, size, size, channels), np.float32),
                             'label': np.zeros((batch_size,), np.int32)}, mesh)
  step_fn = train.make_train_step(config, model, tx, schedule, mesh)
  flops = step_fn.lower(state, batch, jax.random.key(1)).compile().cost_analysis().get('flops', 0.0) * mesh.size
  holder = [state]

  def one_step():
    holder[0], metrics = step_fn(holder[0], batch, jax.random.key(1))
    jax.block_until_ready(metrics)

  seconds = median_seconds(one_step, FLAGS.steps)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'device: {jax.devices()[0].device_kind} x {mesh.size}; model: {params:,} parameters, '
        f'{size}x{size}x{channels}')
  print(f'train step, batch {batch_size}: {seconds:.3f} s ({1 / seconds:.2f} steps/s, '
        f'{batch_size / seconds:.1f} images/s, {flops / seconds / 1e9:.1f} GFLOP/s)')
  if FLAGS.sample_steps:
    sampler = sampling.Sampler('ddim', FLAGS.sample_steps, eta=config.sampling.eta)
    shape = (config.sampling.batch_size, size, size, channels)
    sample_fn = train.make_sample_fn(model, schedule, sampler, shape, mesh)
    seconds = median_seconds(lambda: jax.block_until_ready(sample_fn(holder[0].ema_params, jax.random.key(2), 0)),
                             max(1, FLAGS.steps // 5))
    print(f'DDIM-{FLAGS.sample_steps}, batch {shape[0]}: {seconds:.2f} s ({shape[0] / seconds:.2f} images/s)')


if __name__ == '__main__':
  app.run(main)
