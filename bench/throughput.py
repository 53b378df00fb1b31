"""Train-step and sampling throughput of a config: steps/s, images/s and achieved FLOP/s.

  python bench/throughput.py --config=configs/default.py
  python bench/throughput.py --config=configs/cifar10.py --config.training.batch_size=16 --steps=5
  python bench/throughput.py --config=configs/cifar10.py --config.training.batch_size=16 --steps=2 \
      --sample_steps=0 --profile_dir=/tmp/profile    # where the train step's time goes

Prints the median over --steps timed calls after one warm-up call (compilation excluded), the whole
batch as one compiled program (whatever training.grad_accum_steps says). With
--profile_dir it also traces one train step (open the trace with TensorBoard's profile plugin or
Perfetto) and prints the time per JAX primitive, forward and backward apart, and the slowest ops.
"""
import collections
import glob
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results  # pylint: disable=g-import-not-at-top,wrong-import-position  # bench/results.py.
from torch_worker import median_seconds  # pylint: disable=g-import-not-at-top,wrong-import-position  # Stdlib only.

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/default.py', 'The config to measure.', lock_config=True)
flags.DEFINE_integer('steps', 10, 'Timed calls per measurement.')
flags.DEFINE_integer('sample_steps', 50, 'DDIM steps for the sampling measurement (0: skip).')
flags.DEFINE_string('profile_dir', None, 'Trace one train step into this directory and print where its time goes.')
flags.DEFINE_integer('profile_top', 15, 'Slowest ops to list with --profile_dir.')
flags.DEFINE_string('out_dir', results.DEFAULT_DIR, "Folder for throughput.md and .json ('' for none).")


def print_profile(compiled_text: str, trace_dir: str, top: int, step_seconds: float) -> None:
  """Prints the time of the traced step's ops (summed over devices) by JAX primitive and the slowest ops.

  Each op of the compiled step is named by its HLO instruction; its op_name metadata tells the JAX
  primitive and, under transpose(...), that it belongs to the backward pass. XLA:CPU runs Eigen's
  convolutions and dots asynchronously: their events cover only the launch, so the time the ops do not
  account for is mostly theirs (YNNPACK fusions are timed in full).
  """
  import jax  # pylint: disable=g-import-not-at-top
  op_names = dict(re.findall(r'%([\w.\-]+) = [^\n]*?op_name="([^"]*)"', compiled_text))
  path = max(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True), key=os.path.getmtime)
  times = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in op_names:
          times[event.name] += event.duration_ns / 1e9
  by_primitive = collections.Counter()
  for op, seconds in times.items():
    direction = 'backward' if 'transpose(' in op_names[op] else 'forward'
    by_primitive[f'{op_names[op].rsplit("/", 1)[-1]} ({direction})'] += seconds
  total = sum(times.values())
  print(f'profile ({path}): {total:.2f} s in {len(times)} ops, summed over devices; not accounted for (mostly '
        f'asynchronous Eigen convolutions and dots): {step_seconds * jax.local_device_count() - total:.2f} s')
  for name, seconds in by_primitive.most_common(top):
    print(f'  {seconds:7.3f} s {100 * seconds / total:5.1f}%  {name}')
  print('slowest ops:')
  for op, seconds in times.most_common(top):
    print(f'  {seconds:7.3f} s  {op}: {op_names[op]}')


def main(argv):
  del argv
  config = FLAGS.config
  config.training.grad_accum_steps = 1  # The whole batch as one compiled program: its FLOPs and its profile.
  from diffusion_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.set_flags(config)
  xla_cpu.tune(config)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from diffusion_jax import experiment, sampling, train  # pylint: disable=g-import-not-at-top

  exp = experiment.build(config)
  mesh = exp.mesh
  state = exp.init_state(jax.random.key(0))
  batch_size, size, channels = config.training.batch_size, config.data.image_size, config.data.channels
  batch = train.shard_batch({'image': np.zeros((batch_size, size, size, channels), np.float32),
                             'label': np.zeros((batch_size,), np.int32)}, mesh)
  step_fn = train.make_train_step(exp).whole  # One program (grad_accum_steps=1).
  flops = step_fn.lower(state, batch, jax.random.key(1)).compile().cost_analysis().get('flops', 0.0) * mesh.size
  holder = [state]

  def one_step():
    holder[0], metrics = step_fn(holder[0], batch, jax.random.key(1))
    jax.block_until_ready(metrics)

  seconds = median_seconds(one_step, FLAGS.steps)
  if FLAGS.profile_dir:
    compiled_text = step_fn.lower(holder[0], batch, jax.random.key(1)).compile().as_text()
    with jax.profiler.trace(FLAGS.profile_dir):
      one_step()
  params = sum(x.size for x in jax.tree.leaves(state.params))
  lines = [f'device: {jax.devices()[0].device_kind} x {mesh.size}; model: {params:,} parameters, '
           f'{size}x{size}x{channels}; command: python {" ".join(sys.argv)}',
           f'train step, batch {batch_size}: {seconds:.3f} s ({1 / seconds:.2f} steps/s, '
           f'{batch_size / seconds:.1f} images/s, {flops / seconds / 1e9:.1f} GFLOP/s)']
  figures = {'device': jax.devices()[0].device_kind, 'devices': mesh.size, 'params': params, 'batch': batch_size,
             'train_step_seconds': seconds, 'flops_per_step': flops}
  print('\n'.join(lines))
  if FLAGS.profile_dir:
    print_profile(compiled_text, FLAGS.profile_dir, FLAGS.profile_top, seconds)
  if FLAGS.sample_steps:
    sampler = sampling.Sampler('ddim', FLAGS.sample_steps, eta=config.sampling.eta)
    sample_fn = exp.sample_fn(sampler)
    seconds = median_seconds(lambda: jax.block_until_ready(sample_fn(holder[0].ema_params, jax.random.key(2), 0)),
                             max(1, FLAGS.steps // 5))
    n = config.sampling.batch_size
    lines.append(f'DDIM-{FLAGS.sample_steps}, batch {n}: {seconds:.2f} s ({n / seconds:.2f} images/s)')
    figures.update(sample_steps=FLAGS.sample_steps, sample_batch=n, sample_seconds=seconds)
    print(lines[-1])
  results.write(FLAGS.out_dir, 'throughput', '\n\n'.join(lines), figures)


if __name__ == '__main__':
  app.run(main)
