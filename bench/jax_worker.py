"""The JAX side of bench/vs_pytorch.py and bench/speed_card.py: our U-Net serving timing requests over stdin/stdout.

  python bench/jax_worker.py   # Started by the drivers in a fresh process per configuration; speaks JSON lines.

The protocol is bench/torch_worker.py's: {"ok": true, "hello": {...}} first, then one answer per request:

  build    {"op": "build", "model": configs/ name, "op_name": "train"|"forward"|"ddim"|"dpm++2m"|"ddpm", "batch",
            "sample_steps", "grad_accum_steps", "dtype", "seed", "num_cpu_devices"?, "cpu_scheduler"?,
            "cpu_kernels"?, "overrides"?: {"section.key": value}}
           -> {"params", "flops" (per call, all devices), "compile_seconds", "platform", "device_kind", ...}
  run      {"op": "run", "calls"?: n} -> {"seconds": s} for n calls in a row (the last one waited for).
  reset_peak / memory / quit.

Built as main.py builds a run: xla_cpu.set_flags / xla_cpu.tune on the CPU, then experiment.build.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position  # bench/harness.py.
import torch_worker  # pylint: disable=g-import-not-at-top,wrong-import-position  # bench/torch_worker.py: the protocol.
sys.path.insert(0, harness.REPO)
from diffusion_jax import xla_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position


class JaxBench:
  """One built operation of our U-Net (train step, jitted forward or sampler), timed call by call."""

  def __init__(self):
    self.fn = None
    self.jax = None

  def build(self, r: dict) -> dict:
    config = harness.load_config(r['model'])
    batch = r['batch']
    config.training.batch_size = config.sampling.batch_size = batch
    config.training.grad_accum_steps = r['grad_accum_steps']
    config.model.dtype = r['dtype']
    if r.get('num_cpu_devices') is not None:
      config.num_cpu_devices = r['num_cpu_devices']
    for key in ('cpu_scheduler', 'cpu_kernels'):
      if r.get(key) is not None:
        config[key] = r[key]
    for key, value in r.get('overrides', {}).items():  # 'model.remat': True, ...
      section, name = key.split('.')
      config[section][name] = value
    xla_cpu.set_flags(config)
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
    from diffusion_jax import experiment, perf, runtime, sampling, train  # pylint: disable=g-import-not-at-top
    xla_cpu.tune(config)
    self.jax = jax

    exp = experiment.build(config)
    mesh, model, schedule = exp.mesh, exp.model, exp.schedule
    op = r['op_name']
    compile_seconds = 0.0
    if op == 'train':  # Compiled before the state is allocated, as train.train does.
      start = time.perf_counter()
      train_step = train.make_train_step(exp).compile(exp.abstract_state, train.batch_spec(exp), jax.random.key(1))
      compile_seconds = time.perf_counter() - start
      state = exp.init_state(jax.random.key(r['seed']))
      model_params = state.params
    else:  # The forward and the samplers hold only the params, as the PyTorch side then holds only the model.
      model_params = exp.init_params(jax.random.key(r['seed']))
    params = sum(x.size for x in jax.tree.leaves(model_params))
    size, channels = config.data.image_size, config.data.channels
    rng = np.random.default_rng(r['seed'] + 1)
    images = rng.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32)
    batch_sharding = NamedSharding(mesh, P('batch'))
    forward = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, train=False),
                      compiler_options=runtime.inference_compiler_options())  # As the samplers.
    reply = {}
    start = time.perf_counter()  # The forward and the samplers compile below.
    if op == 'train':
      host_batch = {'image': images, 'label': np.zeros((batch,), np.int32)}
      data = train.shard_batch(host_batch, mesh, exp.grad_accum_steps)
      flops = train_step.flops(mesh.size)  # With micro-batches, within 5% of the whole batch's step (a test).
      reply['grad_accum_steps'] = exp.grad_accum_steps
      holder = [state]

      def step():
        holder[0], metrics = train_step(holder[0], data, jax.random.key(1))
        return holder[0], metrics

      self.fn = step
    elif op == 'forward':
      x = jax.device_put(images, batch_sharding)
      t = jax.device_put(rng.integers(0, schedule.num_timesteps, (batch,)).astype(np.int32), batch_sharding)
      compiled = forward.lower(model_params, x, t).compile()
      flops = perf.cost_flops(compiled) * mesh.size  # Per device after SPMD partitioning.
      self.fn = lambda: compiled(model_params, x, t)
    elif op in ('ddim', 'ddpm', 'dpm++2m'):
      s = config.sampling
      if op == 'ddim':
        sampler = sampling.Sampler('ddim', r['sample_steps'], eta=s.eta, spacing=s.spacing, clip_x0=s.clip_x0)
      elif op == 'dpm++2m':
        sampler = sampling.Sampler('dpm++2m', r['sample_steps'], eta=0.0, spacing=s.spacing, clip_x0=s.clip_x0)
      else:
        sampler = sampling.Sampler('ddpm', schedule.num_timesteps, variance='fixedlarge', clip_x0=s.clip_x0)
      shape = (batch, size, size, channels)
      sample_fn = exp.sample_fn(sampler)
      args = (model_params, jax.random.key(2), np.int32(0))
      compiled = sample_fn.lower(*args).compile()
      timesteps, prev_timesteps = sampler.timesteps(schedule.num_timesteps)
      # XLA counts a scan body once: the cost of one forward (the lowered, global module) times the model calls.
      x = jax.ShapeDtypeStruct(shape, np.float32, sharding=batch_sharding)
      t = jax.ShapeDtypeStruct((batch,), np.int32, sharding=batch_sharding)
      flops = perf.cost_flops(forward.lower(model_params, x, t)) * len(timesteps)
      self.fn = lambda: compiled(*args)
      reply.update(timesteps=timesteps.tolist(), prev_timesteps=prev_timesteps.tolist(), eta=sampler.eta,
                   clip_x0=sampler.clip_x0)
    else:
      raise ValueError(f'Unknown operation {op!r}.')
    compile_seconds += time.perf_counter() - start
    device = jax.devices()[0]
    o = config.optim
    reply.update(
        params=params, flops=flops, compile_seconds=compile_seconds, num_devices=mesh.size,
        platform=device.platform, device_kind=device.device_kind, jax_version=jax.__version__,
        xla_flags=os.environ.get('XLA_FLAGS', ''), cpu_kernels=xla_cpu.kernels(),
        image_size=size, channels=channels, ema_decay=config.training.ema_decay,
        alphas_cumprod=np.asarray(schedule.alphas_cumprod, np.float64).tolist(),
        betas=np.asarray(schedule.betas, np.float64).tolist(),
        optim={k: o[k] for k in ('learning_rate', 'beta1', 'beta2', 'eps', 'grad_clip')})
    return reply

  def run(self, r: dict) -> dict:
    return torch_worker.timed_run(self.fn, r, lambda out: self.jax.block_until_ready(out))

  def reset_peak(self, r: dict) -> dict:
    del r
    return {'reset': torch_worker.reset_peak_rss()}

  def memory(self, r: dict) -> dict:
    del r
    stats = torch_worker.memory()
    if self.jax is not None and self.jax.devices()[0].platform != 'cpu':
      device_stats = [d.memory_stats() or {} for d in self.jax.local_devices()]
      if all('peak_bytes_in_use' in s for s in device_stats):
        stats['device_peak'] = max(s['peak_bytes_in_use'] for s in device_stats)
    return stats


def main() -> None:
  # Import the frameworks before saying hello, so that its RSS is that of a started process (no backend yet:
  # the build request still chooses the number of CPU devices).
  import jax  # pylint: disable=g-import-not-at-top,unused-import
  from diffusion_jax import experiment, sampling, train  # pylint: disable=g-import-not-at-top,unused-import
  bench = JaxBench()
  torch_worker.serve({'build': bench.build, 'run': bench.run, 'reset_peak': bench.reset_peak,
                      'memory': bench.memory}, {'python': sys.version.split()[0], 'memory': torch_worker.memory()})


if __name__ == '__main__':
  main()
