"""This project's U-Net against the PyTorch peer (diffusers `UNet2DModel`, same network), alternating, in one run.

  python bench/vs_pytorch.py                                   # CIFAR-10 and MNIST models, batch 16 and 128
  python bench/vs_pytorch.py --models=mnist --batches=2 --ops=train,forward,sample --repeats=2 --sample_steps=3
  python bench/vs_pytorch.py --models=cifar10 --batches=16 --ops=sample --sample_steps=50 --repeats=1

The PyTorch side needs a side environment (never the project's venv), by default /tmp/torchenv:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 diffusers

For every (model, op, batch) the script starts two fresh worker processes, a JAX one (this file with
--worker=jax, in this venv) and a PyTorch one (bench/torch_worker.py under --torch_python), builds the same
network in both (parameter counts are asserted equal), compiles / warms up, and then alternates timed calls:
one JAX call, one PyTorch call, --repeats times, so that machine noise hits both sides alike. Each call is
timed inside its worker (no IPC in the figure). It prints per-configuration medians, the ratio, peak
memory and achieved FLOP/s (and, on a GPU or TPU, MFU against the chip's peak) as a markdown table.

Ops: train (the full train step: DDPM eps loss, backward, grad clipping, Adam, EMA), forward (inference),
sample (DDIM with --sample_steps model calls) and ddpm (ancestral sampling, all T model calls).
Models: any configs/<name>.py (cifar10, mnist, default, ...), unconditional, eps / MSE.
"""
import ctypes
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results as results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position  # bench/results.py.
import torch_worker  # pylint: disable=g-import-not-at-top,wrong-import-position  # bench/torch_worker.py: the protocol.
from diffusion_jax import xla_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['cifar10', 'mnist'], 'Config names under configs/ (e.g. cifar10, mnist, default).')
flags.DEFINE_list('batches', ['16', '128'], 'Global batch sizes (train, forward and sampling).')
flags.DEFINE_list('ops', ['train', 'forward'], 'Any of train, forward, sample (DDIM, --sample_steps), ddpm (all T).')
flags.DEFINE_integer('repeats', 3, 'Timed calls per side and configuration (alternating JAX, PyTorch).')
flags.DEFINE_integer('warmup', 1, 'Untimed calls per side before timing (after JAX compilation).')
flags.DEFINE_integer('sample_steps', 50, 'DDIM steps of the sample op.')
flags.DEFINE_integer('threads', 2, 'torch.set_num_threads of the PyTorch worker.')
flags.DEFINE_string('torch_python', '/tmp/torchenv/bin/python', 'Python of the side environment with torch, diffusers.')
flags.DEFINE_string('torch_device', 'auto', 'auto (cuda if available, else cpu), cpu or cuda.')
flags.DEFINE_integer('num_cpu_devices', None, 'JAX CPU devices (default: the config\'s num_cpu_devices; -1: one '
                     'per core dividing the batch). Ignored on accelerators.')
flags.DEFINE_enum('cpu_scheduler', None, xla_cpu.SCHEDULERS,
                  'XLA:CPU op scheduler of the JAX side (default: the config\'s cpu_scheduler).')
flags.DEFINE_integer('grad_accum_steps', 0, 'training.grad_accum_steps of the JAX train step: the same update from '
                     'this many micro-batches; 0: the project\'s automatic choice (on a CPU, micro-batches of 16 for '
                     'per-device batches that are multiples of 16 above 32), 1: the whole batch. The PyTorch '
                     'side always does one whole-batch step.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype: model.dtype on the JAX side, '
                  'torch.autocast on the PyTorch side; parameters stay float32 on both.')
flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s for MFU (default: from the table PEAK_TFLOPS by device kind).')
flags.DEFINE_integer('seed', 0, 'Seed of parameters and inputs.')
flags.DEFINE_string('out_dir', results_lib.DEFAULT_DIR, 'Folder for the table (vs_pytorch.md) and the figures '
                    '(vs_pytorch.json) of the run; \'\' for none.')
flags.DEFINE_enum('worker', None, ['jax'], 'Internal: run as the JAX worker process, serving stdin requests.')

KNOWN_PARAMS = {'cifar10': 35_746_307}  # Ho et al.'s CIFAR-10 model; google/ddpm-cifar10-32.
# Dense peak TFLOP/s by (device kind substring, dtype), first match wins. Sources: NVIDIA H100 / H200 / A100
# datasheets (SXM; without sparsity; float32 is the non-tensor-core figure, TF32 tensor cores: 494 on H100),
# Google Cloud TPU pages (bfloat16; XLA runs float32 matmuls in bfloat16 passes by default).
PEAK_TFLOPS = (('H100 PCIe', {'bfloat16': 756.0, 'float32': 51.0}),
               ('H100', {'bfloat16': 989.0, 'float32': 67.0}),
               ('H200', {'bfloat16': 989.0, 'float32': 67.0}),
               ('A100', {'bfloat16': 312.0, 'float32': 19.5}),
               ('TPU v4', {'bfloat16': 275.0, 'float32': 275.0}),
               ('TPU v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),
               ('TPU v5', {'bfloat16': 459.0, 'float32': 459.0}),
               ('TPU v6 lite', {'bfloat16': 918.0, 'float32': 918.0}))
OP_NAMES = {'train': 'train', 'forward': 'forward', 'sample': 'ddim', 'ddpm': 'ddpm'}
TORCHENV_HINT = ('create it with: python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 '
                 'diffusers (or point --torch_python at a Python that has torch and diffusers)')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2.0**30


def load_config(name: str):
  """configs/<name>.py's config (imported from the repository root)."""
  import importlib  # pylint: disable=g-import-not-at-top
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  try:
    module = importlib.import_module(f'configs.{name}')
  except ModuleNotFoundError as e:
    available = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs')) if f.endswith('.py') and f[0] != '_')
    raise app.UsageError(f'Unknown model {name!r} (no configs/{name}.py); choose from {available}.') from e
  return module.get_config()


def padded_size(image_size: int, num_levels: int) -> int:
  """The feature-map size of level 0: the image zero-padded to a multiple of 2^(levels-1) (as our UNet does)."""
  factor = 2 ** (num_levels - 1)
  return -(-image_size // factor) * factor


def diffusers_unet_kwargs(config) -> dict:
  """UNet2DModel arguments of the network equal to config.model (as tests/fixtures/make_diffusers_fixtures.py)."""
  m, d = config.model, config.data
  problems = []
  if m.get('num_classes', 0):
    problems.append(f'model.num_classes={m.num_classes} (only unconditional models)')
  if not m.resamp_with_conv:
    problems.append('model.resamp_with_conv=False (diffusers resamples with convolutions)')
  if config.diffusion.parameterization != 'eps' or config.diffusion.loss != 'mse':
    problems.append(f'diffusion.parameterization={config.diffusion.parameterization!r}, diffusion.loss='
                    f'{config.diffusion.loss!r} (the PyTorch side trains eps with MSE)')
  if problems:
    raise app.UsageError('Cannot compare this config with the PyTorch peer: ' + '; '.join(problems) + '.')
  size = padded_size(d.image_size, len(m.ch_mult))
  attn = [size // 2**level in m.attn_resolutions for level in range(len(m.ch_mult))]
  return dict(
      sample_size=size, in_channels=d.channels, out_channels=d.channels, layers_per_block=m.num_res_blocks,
      block_out_channels=[m.ch * mult for mult in m.ch_mult],
      down_block_types=['AttnDownBlock2D' if a else 'DownBlock2D' for a in attn],
      up_block_types=['AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn)],
      norm_num_groups=m.num_groups, norm_eps=1e-6, act_fn='silu', flip_sin_to_cos=False, freq_shift=1,
      downsample_padding=0, downsample_type='conv', upsample_type='conv', time_embedding_type='positional',
      attention_head_dim=None, dropout=m.dropout, center_input_sample=False, resnet_time_scale_shift='default',
      add_attention=True, mid_block_type='UNetMidBlock2D', mid_block_scale_factor=1, attn_norm_num_groups=None,
      class_embed_type=None, num_class_embeds=None)


# ------------------------------------------------------------------------------------------------------------
# The JAX worker (this file with --worker=jax): a fresh process per configuration.
# ------------------------------------------------------------------------------------------------------------
class JaxBench:
  """One built operation of our U-Net (train step, jitted forward or sampler), timed call by call."""

  def __init__(self):
    self.fn = None
    self.jax = None

  def build(self, r: dict) -> dict:
    config = load_config(r['model'])
    batch = r['batch']
    config.training.batch_size = config.sampling.batch_size = batch
    config.training.grad_accum_steps = r['grad_accum_steps']
    config.model.dtype = r['dtype']
    if r['num_cpu_devices'] is not None:
      config.num_cpu_devices = r['num_cpu_devices']
    if r['cpu_scheduler'] is not None:
      config.cpu_scheduler = r['cpu_scheduler']
    xla_cpu.set_flags(config)
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
    from diffusion_jax import experiment, runtime, sampling, train  # pylint: disable=g-import-not-at-top
    xla_cpu.tune(config)
    self.jax = jax

    exp = experiment.build(config)
    mesh, model, schedule = exp.mesh, exp.model, exp.schedule
    op = r['op_name']
    if op == 'train':
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
    start = time.perf_counter()
    if op == 'train':
      host_batch = {'image': images, 'label': np.zeros((batch,), np.int32)}
      accum_steps = exp.grad_accum_steps
      data = train.shard_batch(host_batch, mesh, accum_steps)
      train_step = train.make_train_step(exp)
      if accum_steps == 1:  # Per-device cost of the shard_map'ed step, times the devices (as bench/throughput.py).
        train_step = train_step.whole.lower(state, data, jax.random.key(1)).compile()
        flops = train_step.cost_analysis().get('flops', 0.0) * mesh.size
      else:  # The same update from micro-batches, compiled by a first call; the FLOPs of the whole batch's step.
        whole_batch = config.copy_and_resolve_references()
        whole_batch.training.grad_accum_steps = 1
        flops = train.make_train_step(experiment.build(whole_batch, mesh)).whole.lower(
            state, train.shard_batch(host_batch, mesh), jax.random.key(1)).cost_analysis().get('flops', 0.0) * mesh.size
        state, _ = jax.block_until_ready(train_step(state, data, jax.random.key(1)))
      reply['grad_accum_steps'] = accum_steps
      holder = [state]

      def step():
        holder[0], metrics = train_step(holder[0], data, jax.random.key(1))
        return holder[0], metrics

      self.fn = step
    elif op == 'forward':
      x = jax.device_put(images, batch_sharding)
      t = jax.device_put(rng.integers(0, schedule.num_timesteps, (batch,)).astype(np.int32), batch_sharding)
      compiled = forward.lower(model_params, x, t).compile()
      flops = compiled.cost_analysis().get('flops', 0.0) * mesh.size  # Per device after SPMD partitioning.
      self.fn = lambda: compiled(model_params, x, t)
    elif op in ('ddim', 'ddpm'):
      s = config.sampling
      if op == 'ddim':
        sampler = sampling.Sampler('ddim', r['sample_steps'], eta=s.eta, spacing=s.spacing, clip_x0=s.clip_x0)
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
      flops = forward.lower(model_params, x, t).cost_analysis().get('flops', 0.0) * len(timesteps)
      self.fn = lambda: compiled(*args)
      reply.update(timesteps=timesteps.tolist(), prev_timesteps=prev_timesteps.tolist(), eta=sampler.eta,
                   clip_x0=sampler.clip_x0)
    else:
      raise ValueError(f'Unknown operation {op!r}.')
    compile_seconds = time.perf_counter() - start
    device = jax.devices()[0]
    o = config.optim
    reply.update(
        params=params, flops=flops, compile_seconds=compile_seconds, num_devices=mesh.size,
        platform=device.platform, device_kind=device.device_kind, jax_version=jax.__version__,
        image_size=size, channels=channels, ema_decay=config.training.ema_decay,
        alphas_cumprod=np.asarray(schedule.alphas_cumprod, np.float64).tolist(),
        betas=np.asarray(schedule.betas, np.float64).tolist(),
        optim={k: o[k] for k in ('learning_rate', 'beta1', 'beta2', 'eps', 'grad_clip')})
    return reply

  def run(self, r: dict) -> dict:
    del r
    if self.fn is None:
      raise ValueError('Nothing built: send {"op": "build", ...} first.')
    start = time.perf_counter()
    self.jax.block_until_ready(self.fn())
    return {'seconds': time.perf_counter() - start}

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


def jax_worker_main() -> None:
  # Import the frameworks before saying hello, so that its RSS is that of a started process (no backend yet:
  # the build request still chooses the number of CPU devices).
  import jax  # pylint: disable=g-import-not-at-top,unused-import
  from diffusion_jax import experiment, sampling, train  # pylint: disable=g-import-not-at-top,unused-import
  bench = JaxBench()
  torch_worker.serve({'build': bench.build, 'run': bench.run, 'reset_peak': bench.reset_peak,
                      'memory': bench.memory}, {'python': sys.version.split()[0], 'memory': torch_worker.memory()})


# ------------------------------------------------------------------------------------------------------------
# The driver.
# ------------------------------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
  """A worker process failed or died."""


def _die_with_parent() -> None:
  """In a worker before exec (Linux): SIGTERM it when the driver dies, e.g. on Ctrl-C during a long call."""
  try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG.
  except (OSError, AttributeError):
    pass


class Worker:
  """A worker subprocess answering JSON-line requests; its stderr goes to a log file shown on failure."""

  def __init__(self, name: str, argv: list[str], env: dict, log_dir: str):
    self.name = name
    self.log_path = os.path.join(log_dir, f'{name}.log')
    self.log = open(self.log_path, 'w')  # pylint: disable=consider-using-with
    try:
      self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
          argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO, env=env,
          preexec_fn=_die_with_parent)
    except OSError as e:
      raise WorkerError(f'Cannot start the {name} worker ({shlex.join(argv)}): {e}') from e
    self.hello = self._read()['hello']

  def _tail(self, lines: int = 30) -> str:
    self.log.flush()
    with open(self.log_path) as f:
      return ''.join(f.readlines()[-lines:])

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      code = self.proc.wait()
      raise WorkerError(f'The {self.name} worker exited with status {code}; the end of its log '
                        f'{self.log_path}:\n{self._tail()}')
    reply = json.loads(line)
    if not reply.get('ok'):
      raise WorkerError(f'The {self.name} worker failed:\n{reply.get("error")}')
    return reply

  def call(self, op: str, **kwargs) -> dict:
    try:
      self.proc.stdin.write(json.dumps(dict(kwargs, op=op)) + '\n')
      self.proc.stdin.flush()
    except BrokenPipeError:
      pass  # The worker died; _read reports its exit status and log.
    return self._read()

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.call('quit')
        self.proc.wait(timeout=30)
      except (WorkerError, subprocess.TimeoutExpired, OSError):
        self.proc.kill()
        self.proc.wait()
    self.log.close()


def check_torch_python(path: str) -> None:
  if not (os.path.isfile(path) and os.access(path, os.X_OK)):
    sys.exit(f'vs_pytorch: --torch_python={path} does not exist or is not executable; {TORCHENV_HINT}.')


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  if FLAGS.peak_tflops:
    return FLAGS.peak_tflops
  for key, peaks in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return peaks[dtype]
  return None


def measure(name: str, config, op: str, batch: int, log_dir: str) -> dict:
  """Times one (model, op, batch) in fresh JAX and PyTorch workers, alternating; returns the results."""
  jax_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
  torch_env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'PYTHONHOME')}
  workers = []
  try:
    jax_side = Worker('jax', [sys.executable, os.path.abspath(__file__), '--worker=jax'], jax_env, log_dir)
    workers.append(jax_side)
    torch_side = Worker('torch', [FLAGS.torch_python, os.path.join(REPO, 'bench', 'torch_worker.py')],
                        torch_env, log_dir)
    workers.append(torch_side)
    start = time.perf_counter()
    built = jax_side.call('build', model=name, batch=batch, op_name=OP_NAMES[op], sample_steps=FLAGS.sample_steps,
                          num_cpu_devices=FLAGS.num_cpu_devices, cpu_scheduler=FLAGS.cpu_scheduler, dtype=FLAGS.dtype,
                          grad_accum_steps=FLAGS.grad_accum_steps if op == 'train' else 1,
                          seed=FLAGS.seed)
    jax_build_seconds = time.perf_counter() - start
    timesteps = {k: built.get(k) for k in ('timesteps', 'prev_timesteps', 'eta', 'clip_x0')}
    start = time.perf_counter()
    torch_built = torch_side.call(
        'build', unet=diffusers_unet_kwargs(config), op_name=OP_NAMES[op], batch=batch, image_size=built['image_size'],
        channels=built['channels'], padded_size=padded_size(built['image_size'], len(config.model.ch_mult)),
        alphas_cumprod=built['alphas_cumprod'], betas=built['betas'], optim=built['optim'],
        ema_decay=built['ema_decay'], threads=FLAGS.threads, device=FLAGS.torch_device, dtype=FLAGS.dtype,
        seed=FLAGS.seed, **timesteps)
    torch_build_seconds = time.perf_counter() - start
    if built['params'] != torch_built['params']:
      raise WorkerError(f'{name}: the networks differ: {built["params"]:,} parameters in JAX and '
                        f'{torch_built["params"]:,} in PyTorch.')
    if name in KNOWN_PARAMS and built['params'] != KNOWN_PARAMS[name]:
      raise WorkerError(f'{name}: {built["params"]:,} parameters, expected {KNOWN_PARAMS[name]:,}.')
    label = {'sample': f'DDIM-{FLAGS.sample_steps}', 'ddpm': f'DDPM-{len(built["alphas_cumprod"])}'}.get(op, op)
    if built.get('grad_accum_steps', 1) > 1:
      label += f' ({built["grad_accum_steps"]} micro-batches)'
    progress(f'{name} {label} batch {batch}: {built["params"]:,} parameters in both; JAX on {built["num_devices"]} '
             f'{built["platform"]} device(s), compiled in {built["compile_seconds"]:.1f} s; PyTorch on '
             f'{torch_built["device"]}, built in {torch_build_seconds:.1f} s')
    for _ in range(FLAGS.warmup):
      jax_side.call('run')
      torch_side.call('run')
    build_memory = {'jax': jax_side.call('memory'), 'torch': torch_side.call('memory')}
    for w in workers:
      w.call('reset_peak')
    times = {'jax': [], 'torch': []}
    pids = [w.proc.pid for w in workers] + [os.getpid()]
    ticks_before, start = cpu_ticks(pids), time.perf_counter()
    for i in range(FLAGS.repeats):
      times['jax'].append(jax_side.call('run')['seconds'])
      times['torch'].append(torch_side.call('run')['seconds'])
      progress(f'  repeat {i + 1}/{FLAGS.repeats}: JAX {times["jax"][-1]:.3f} s, PyTorch {times["torch"][-1]:.3f} s')
    foreign = foreign_cpu_share(ticks_before, cpu_ticks(pids), time.perf_counter() - start)
    steady_memory = {'jax': jax_side.call('memory'), 'torch': torch_side.call('memory')}
  finally:
    for w in workers:
      w.close()
  result = dict(model=name, op=label, batch=batch, params=built['params'], flops=built['flops'],
                num_devices=built['num_devices'], platform=built['platform'], device_kind=built['device_kind'],
                jax_version=built['jax_version'], torch_hello=torch_side.hello,
                torch_device=torch_built['device'], compile_seconds=built['compile_seconds'],
                jax_build_seconds=jax_build_seconds, torch_build_seconds=torch_build_seconds, times=times,
                foreign_cpu=foreign)
  for side in ('jax', 'torch'):
    before, during = build_memory[side], steady_memory[side]
    result[f'{side}_median'] = statistics.median(times[side])
    result[f'{side}_peak'] = max(before['rss_peak'], during['rss_peak'])  # Whole life of the worker.
    result[f'{side}_steady_peak'] = during['rss_peak']  # Timed calls only (reset after warm-up).
    result[f'{side}_start_rss'] = (jax_side if side == 'jax' else torch_side).hello['memory']['rss_now']
    result[f'{side}_device_peak'] = during.get('device_peak')
  return result


def cpu_ticks(pids: list[int]) -> tuple[int, int] | None:
  """(busy clock ticks of the whole machine, ticks used by the processes pids) from /proc; None without it."""
  try:
    with open('/proc/stat') as f:
      user, nice, system, _, _, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    own = 0
    for pid in pids:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      own += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5)).
  except (OSError, ValueError, IndexError):
    return None
  return user + nice + system + irq + softirq + steal, own


def foreign_cpu_share(before, after, seconds: float) -> float | None:
  """Share of the machine's CPU time used by other processes than ours between two cpu_ticks readings."""
  if before is None or after is None or seconds <= 0:
    return None
  cores = os.cpu_count() or 1
  foreign = (after[0] - before[0]) - (after[1] - before[1])
  return max(0.0, foreign / os.sysconf('SC_CLK_TCK') / (seconds * cores))


def progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def machine_description() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  try:
    memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB
  except (ValueError, OSError):
    memory = float('nan')
  load = ', '.join(f'{x:.2f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'
  return (f'{cpu}, {cores} usable cores ({os.cpu_count()} online), {memory:.1f} GiB RAM, load average at start '
          f'{load}; {platform.system()} {platform.release()}')


def share(value: float | None) -> str:
  return 'n/a' if value is None else f'{100 * value:.0f}%'


def report(results: list[dict], command: str, started: str, machine: str) -> str:
  first = results[0]
  accelerator = first['platform'] != 'cpu'
  lines = ['# JAX U-Net vs PyTorch (diffusers UNet2DModel), alternating calls', '',
           f'- command: `{command}`', f'- date: {started}', f'- machine: {machine}',
           f'- JAX {first["jax_version"]}: {first["platform"]} ({first["device_kind"]}), devices per configuration: '
           f'{", ".join(sorted({str(r["num_devices"]) for r in results}))}; PyTorch {first["torch_hello"]["torch"]} '
           f'on {first["torch_device"]}, torch.set_num_threads({FLAGS.threads}); diffusers '
           f'{first["torch_hello"]["diffusers"]}; compute dtype {FLAGS.dtype}',
           f'- {FLAGS.warmup} warm-up and {FLAGS.repeats} timed calls per side, alternating JAX then PyTorch; '
           'medians; fresh worker processes per row']
  for name in dict.fromkeys(r['model'] for r in results):
    row = next(r for r in results if r['model'] == name)
    lines.append(f'- {name}: {row["params"]:,} parameters in both frameworks')
  header = ['model', 'op', 'batch', 'PyTorch s', 'JAX s', 'JAX/PyTorch', 'peak GiB torch', 'peak GiB jax',
            'img/s torch', 'img/s jax', 'GFLOP/s torch', 'GFLOP/s jax']
  if accelerator:
    header += ['MFU torch', 'MFU jax']
  lines += ['', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in results:
    tm, jm = r['torch_median'], r['jax_median']
    peak = lambda side: r[f'{side}_device_peak'] if accelerator and r[f'{side}_device_peak'] else r[f'{side}_peak']
    cells = [r['model'], r['op'], str(r['batch']), f'{tm:.3f}', f'{jm:.3f}', f'{jm / tm:.2f}',
             f'{peak("torch") / GIB:.2f}', f'{peak("jax") / GIB:.2f}', f'{r["batch"] / tm:.1f}',
             f'{r["batch"] / jm:.1f}', f'{r["flops"] / tm / 1e9:.1f}', f'{r["flops"] / jm / 1e9:.1f}']
    if accelerator:
      top = peak_tflops(r['device_kind'], FLAGS.dtype)
      mfu = lambda s: f'{100 * r["flops"] / s / (top * 1e12):.1f}%' if top else 'n/a'
      cells += [mfu(tm) if r['torch_device'].startswith('cuda') else 'n/a (CPU)', mfu(jm)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', '## Details', '', '| model | op | batch | PyTorch s (each) | JAX s (each) | JAX compile s | RSS GiB '
            'at start torch / jax | peak RSS GiB in timed calls torch / jax | GFLOP per call | other CPU load |',
            '|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    each = lambda side: ', '.join(f'{s:.3f}' for s in r['times'][side])
    lines.append(f'| {r["model"]} | {r["op"]} | {r["batch"]} | {each("torch")} | {each("jax")} | '
                 f'{r["compile_seconds"]:.1f} | {r["torch_start_rss"] / GIB:.2f} / {r["jax_start_rss"] / GIB:.2f} | '
                 f'{r["torch_steady_peak"] / GIB:.2f} / {r["jax_steady_peak"] / GIB:.2f} | {r["flops"] / 1e9:.1f} | '
                 f'{share(r["foreign_cpu"])} |')
  busy = [r for r in results if (r['foreign_cpu'] or 0) > 0.1]
  if busy:
    lines += ['', f'**Warning**: other processes used more than 10% of the machine\'s CPU while timing '
              f'{len(busy)} of {len(results)} rows (up to {share(max(r["foreign_cpu"] for r in busy))}; column '
              '"other CPU load"). On oversubscribed cores PyTorch\'s OpenMP threads, which wait for each other at '
              'every parallel region, slow down far more than JAX\'s thread pool, so these ratios are unreliable; '
              'rerun on an idle machine.']
  memory_note = ('device memory: torch.cuda.max_memory_allocated and JAX memory_stats()["peak_bytes_in_use"]'
                 if accelerator else
                 'peak resident memory (VmHWM) of each side\'s worker process over its whole life: Python, the '
                 'framework, parameters, optimizer state, inputs, activations, and for JAX also XLA compilation; '
                 '"peak RSS in timed calls" resets the high-water mark after warm-up (Linux clear_refs) and so '
                 'excludes compilation')
  lines += ['', 'Notes:', f'- Peak GiB: {memory_note}. Each row runs in fresh processes, so rows do not share peaks.',
            '- FLOPs: XLA cost_analysis of our compiled train step / forward (per device, times the devices); for '
            'sampling, the lowered forward times the model calls (XLA counts a scan body once). The PyTorch '
            'GFLOP/s divides the same count by its time.']
  if accelerator:
    top = peak_tflops(first['device_kind'], FLAGS.dtype)
    lines.append(f'- MFU: achieved FLOP/s over a peak of {top} TFLOP/s ({FLAGS.dtype}, {first["device_kind"]}; '
                 '--peak_tflops overrides; table PEAK_TFLOPS: H100 SXM / H200 989 bf16, 67 fp32 dense).')
  lines += ['- Same work on both sides: train = uniform t, N(0, I) noise, q_sample, eps MSE, backward, global-norm '
            'clipping, Adam, EMA of the params (plus our loss / norm metrics); forward = inference (no dropout); '
            'sampling = the sampler loop of model calls and updates with clipped x_0.',
            *(['- train (k micro-batches): the JAX step sums the gradients of k micro-batches into one update '
               '(training.grad_accum_steps; the same update as the whole batch); the PyTorch step is one whole batch.']
              if any('micro-batches' in r['op'] for r in results) else []),
            '- Other CPU load: CPU time used by processes other than this benchmark\'s while timing a row, as a '
            'share of all cores (from /proc/stat).',
            '- Images whose size is not a multiple of 2^(levels-1) (MNIST 28x28 with 4 levels) are zero-padded to '
            'it (32x32) inside our U-Net; the PyTorch side pads before and crops after UNet2DModel, so both '
            'compute on the padded maps (attention resolutions refer to them).']
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.worker == 'jax':
    jax_worker_main()
    return
  bad_ops = [op for op in FLAGS.ops if op not in OP_NAMES]
  if bad_ops:
    raise app.UsageError(f'Unknown --ops {bad_ops}; choose from {list(OP_NAMES)}.')
  try:
    batches = [int(b) for b in FLAGS.batches]
  except ValueError as e:
    raise app.UsageError(f'--batches must be integers, got {FLAGS.batches}.') from e
  if FLAGS.repeats < 1 or FLAGS.warmup < 0 or FLAGS.sample_steps < 1:
    raise app.UsageError('--repeats and --sample_steps must be >= 1, --warmup >= 0.')
  check_torch_python(FLAGS.torch_python)
  configs = {name: load_config(name) for name in FLAGS.models}
  for config in configs.values():
    diffusers_unet_kwargs(config)  # Raises for configs the PyTorch side cannot reproduce.
  command = shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(REPO) else 'python',
                        os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
  started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
  machine = machine_description()
  log_dir = tempfile.mkdtemp(prefix='vs_pytorch_')
  results = []
  try:
    for name, config in configs.items():
      for op in FLAGS.ops:
        for batch in batches:
          results.append(measure(name, config, op, batch, log_dir))
  except WorkerError as e:
    message = str(e)
    if ('No module named' in message or 'ModuleNotFoundError' in message) and 'pip install torch' not in message:
      message += f'\nThe PyTorch side environment is incomplete; {TORCHENV_HINT}.'
    if results:
      print(report(results, command, started, machine))
    sys.exit(f'vs_pytorch: {message}\n(worker logs in {log_dir})')
  for f in os.listdir(log_dir):
    os.remove(os.path.join(log_dir, f))
  os.rmdir(log_dir)
  table = report(results, command, started, machine)
  print(table)
  results_lib.write(FLAGS.out_dir, 'vs_pytorch', table,
                    {'command': command, 'date': started, 'machine': machine, 'rows': results})


if __name__ == '__main__':
  app.run(main)
