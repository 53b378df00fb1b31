"""What the JAX-vs-PyTorch benchmarks share: configs by name, the diffusers twin of a config, worker processes.

bench/vs_pytorch.py (CPU, alternating calls) and bench/speed_card.py (accelerators) drive a JAX worker
(bench/jax_worker.py) and a PyTorch worker (bench/torch_worker.py) through `Worker`: JSON lines over stdin and
stdout, one request at a time, stderr to a log shown when a worker fails.
"""
import ctypes
import importlib
import json
import os
import platform
import select
import shlex
import signal
import subprocess
import sys

from absl import app

KNOWN_PARAMS = {'cifar10': 35_746_307}  # Ho et al.'s CIFAR-10 model; google/ddpm-cifar10-32.
TORCHENV_HINT = ('create it with: python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 '
                 'diffusers (or point --torch_python at a Python that has torch and diffusers)')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2.0**30


def load_config(name: str):
  """configs/<name>.py's config (imported from the repository root)."""
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


class WorkerError(RuntimeError):
  """A worker process failed or died."""


class WorkerTimeout(WorkerError):
  """A worker took longer than its call's timeout and was stopped."""


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

  def _read(self, timeout: float | None = None) -> dict:
    if timeout is not None and not select.select([self.proc.stdout], [], [], timeout)[0]:
      self.proc.kill()
      self.proc.wait()
      raise WorkerTimeout(f'The {self.name} worker did not answer within {timeout:.0f} s; stopped it.')
    line = self.proc.stdout.readline()
    if not line:
      code = self.proc.wait()
      raise WorkerError(f'The {self.name} worker exited with status {code}; the end of its log '
                        f'{self.log_path}:\n{self._tail()}')
    reply = json.loads(line)
    if not reply.get('ok'):
      raise WorkerError(f'The {self.name} worker failed:\n{reply.get("error")}')
    return reply

  def call(self, op: str, timeout: float | None = None, **kwargs) -> dict:
    """Sends {"op": op, **kwargs} and returns the answer; a worker silent for `timeout` s is killed (WorkerTimeout)."""
    try:
      self.proc.stdin.write(json.dumps(dict(kwargs, op=op)) + '\n')
      self.proc.stdin.flush()
    except BrokenPipeError:
      pass  # The worker died; _read reports its exit status and log.
    return self._read(timeout)

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.call('quit')
        self.proc.wait(timeout=30)
      except (WorkerError, subprocess.TimeoutExpired, OSError):
        self.proc.kill()
        self.proc.wait()
    self.log.close()


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
