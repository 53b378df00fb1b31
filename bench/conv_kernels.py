"""A U-Net's convolutions one at a time, JAX against PyTorch, side by side: where a train step's kernel time goes.

  python bench/conv_kernels.py                                  # configs/cifar10.py and mnist.py, batch 16
  python bench/conv_kernels.py --models=default --batch=32 --calls=5 --rounds=2

Convolutions are most of a train step on a CPU (docs/performance.md). For each distinct convolution of a
config's U-Net (read from the jaxpr of its forward: input and kernel shapes, strides, padding) this times its
forward, input gradient and kernel gradient in JAX, in this process with the train step's XLA:CPU settings
(xla_cpu.set_flags: flags; xla_cpu.tune: the kernels of the convolutions, --cpu_kernels), and in PyTorch in a
worker process (bench/torch_worker.py's protocol; NCHW float32 as diffusers runs, conv2d and aten's
convolution_backward), alternating JAX and PyTorch per convolution, --rounds times; medians. Then it sums
them over the network as a train step runs them (every forward and kernel gradient, every input gradient but
the first convolution's: the images need none) and as a forward does. Neither side adds a bias. Prints one
table per model, writes bench/results/conv_kernels.md and .json.

The PyTorch side needs the side environment of bench/vs_pytorch.py (/tmp/torchenv, see there).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_worker  # pylint: disable=wrong-import-position  # bench/torch_worker.py (stdlib only).

PASSES = ('fwd', 'dx', 'dw')  # Forward, input gradient, kernel gradient.


def torch_convolution(r: dict) -> dict:
  """The PyTorch worker's `conv` request: {"lhs": NHWC shape, "rhs": HWIO shape, "strides", "padding": [[lo, hi],
  [lo, hi]], "calls", "threads", "device": cpu | cuda} -> {pass: median seconds of `calls` timed calls after one
  untimed, the device's work done}. With "inputs": {"x" (NHWC), "kernel" (HWIO), "dy" (NHWC output gradient)}
  as nested lists it computes on those instead and answers {"values": {pass: result, NHWC / HWIO lists}}."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(r['threads'])
  torch.backends.cudnn.benchmark = True  # Picks the fastest algorithm per shape, as XLA autotunes on GPUs.
  device = torch.device(r['device'])
  wait = torch.cuda.synchronize if device.type == 'cuda' else lambda: None
  n, h, w, c = r['lhs']
  kh, kw, _, out = r['rhs']
  (top, bottom), (left, right) = r['padding']
  if 'inputs' in r:
    x = torch.tensor(r['inputs']['x']).permute(0, 3, 1, 2)
    kernel = torch.tensor(r['inputs']['kernel']).permute(3, 2, 0, 1)
  else:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=generator)
    kernel = torch.randn(out, c, kh, kw, generator=generator) / (kh * kw * c) ** 0.5
  x, kernel = x.to(device).contiguous(), kernel.to(device).contiguous()
  symmetric = top == bottom and left == right
  if not symmetric:  # conv2d pads symmetrically: the input is padded once, untimed, and then not padded.
    x = F.pad(x, (left, right, top, bottom))
  padding = [top, left] if symmetric else [0, 0]
  with torch.no_grad():
    y = F.conv2d(x, kernel, stride=r['strides'], padding=padding)
  if 'inputs' in r:
    dy = torch.tensor(r['inputs']['dy']).permute(0, 3, 1, 2).to(device).contiguous()
  else:
    dy = torch.randn(y.shape, generator=generator).to(device)
  backward = lambda mask: torch.ops.aten.convolution_backward(dy, x, kernel, None, r['strides'], padding, [1, 1],
                                                              False, [0, 0], 1, mask)
  calls = {'fwd': lambda: F.conv2d(x, kernel, stride=r['strides'], padding=padding),
           'dx': lambda: backward([True, False, False])[0], 'dw': lambda: backward([False, True, False])[1]}
  with torch.no_grad():
    if 'inputs' in r:
      dx = calls['dx']() if symmetric else calls['dx']()[:, :, top:top + h, left:left + w]  # The unpadded input's.
      return {'values': {'fwd': calls['fwd']().permute(0, 2, 3, 1).tolist(), 'dx': dx.permute(0, 2, 3, 1).tolist(),
                         'dw': calls['dw']().permute(2, 3, 1, 0).tolist()}}
    return {name: torch_worker.median_seconds(lambda: (calls[name](), wait()), r['calls']) for name in PASSES}


def torch_worker_main() -> None:
  """Serves `conv` requests on stdin/stdout (bench/torch_worker.py's protocol); says whether it has CUDA."""
  import torch  # pylint: disable=g-import-not-at-top
  torch_worker.serve({'conv': torch_convolution}, {'torch': torch.__version__, 'cuda': torch.cuda.is_available()})


if __name__ == '__main__' and sys.argv[1:] == ['--torch_worker']:  # Under the side environment's Python.
  torch_worker_main()
  sys.exit()

# pylint: disable=g-import-not-at-top,wrong-import-position
import collections
import datetime
import shlex
import statistics
import tempfile

from absl import app, flags

import harness  # bench/harness.py.
from harness import REPO, TORCHENV_HINT, Worker, WorkerError, progress
import results as results_lib  # bench/results.py.
sys.path.insert(0, REPO)
from diffusion_jax import xla_cpu
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['cifar10', 'mnist'], 'Config names under configs/ (e.g. cifar10, mnist, default).')
flags.DEFINE_integer('batch', 16, 'Batch size of the convolutions (per device, as a train step runs them).')
flags.DEFINE_integer('calls', 5, 'Timed calls per pass, back to back after one untimed; their median.')
flags.DEFINE_integer('rounds', 3, 'Alternations of JAX and PyTorch per convolution; the median over rounds.')
flags.DEFINE_integer('threads', 2, 'torch.set_num_threads of the PyTorch worker.')
flags.DEFINE_string('torch_python', '/tmp/torchenv/bin/python',
                    "Python of the side environment with torch ('none': the JAX columns only).")
flags.DEFINE_enum('torch_device', 'auto', ['auto', 'cpu', 'cuda'], "auto: cuda where JAX runs on a GPU, else cpu.")
flags.DEFINE_enum('cpu_kernels', None, xla_cpu.CPU_KERNELS,
                  "Kernels of JAX's convolutions on the CPU (default: the configs' cpu_kernels).")
flags.DEFINE_string('out_dir', results_lib.DEFAULT_DIR, "Folder for conv_kernels.md and .json ('' for none).")


def model_convolutions(config) -> list[dict]:
  """The convolutions of the config's U-Net in program order, one entry per distinct shape with its count.

  Each: {"lhs": NHWC input shape, "rhs": HWIO kernel shape, "strides", "padding": [[lo, hi], [lo, hi]],
  "count", "first": whether the network's first convolution (on the images) is one of them}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from diffusion_jax import experiment  # pylint: disable=g-import-not-at-top
  exp = experiment.build(config)
  b, size, channels = config.training.batch_size, config.data.image_size, config.data.channels
  labels = jnp.zeros((b,), jnp.int32) if config.model.num_classes else None
  jaxpr = jax.make_jaxpr(lambda p, x, t: exp.model.apply({'params': p}, x, t, labels))(
      exp.abstract_params, jax.ShapeDtypeStruct((b, size, size, channels), jnp.float32),
      jax.ShapeDtypeStruct((b,), jnp.int32))
  found = collections.OrderedDict()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ('scan', 'while', 'cond'):  # Their bodies run a number of times not counted here.
        raise ValueError(f'The U-Net\'s forward has a {eqn.primitive.name}: its convolutions cannot be counted.')
      if eqn.primitive.name == 'conv_general_dilated':
        p = eqn.params
        if (p['dimension_numbers'].lhs_spec, p['dimension_numbers'].rhs_spec) != ((0, 3, 1, 2), (3, 2, 0, 1)) or \
            p['feature_group_count'] != 1 or set(p['lhs_dilation'] + p['rhs_dilation']) != {1}:
          raise ValueError(f'Only NHWC x HWIO convolutions without dilation or groups are measured, got {p}.')
        key = (tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape), tuple(p['window_strides']),
               tuple(tuple(int(v) for v in pad) for pad in p['padding']))
        entry = found.setdefault(key, {'lhs': list(key[0]), 'rhs': list(key[1]), 'strides': list(key[2]),
                                       'padding': [list(pad) for pad in key[3]], 'count': 0, 'first': not found})
        entry['count'] += 1
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, 'eqns'):  # A Jaxpr or ClosedJaxpr: pjit, custom_jvp_call, ...
            visit(sub)

  visit(jaxpr.jaxpr)
  return list(found.values())


def jax_passes(conv: dict) -> dict:
  """{pass: jitted fn(x NHWC, kernel HWIO, dy NHWC output gradient)}: the forward (dy unused), the input
  gradient and the kernel gradient of `conv`, each its own program."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  forward = lambda x, kernel: lax.conv_general_dilated(x, kernel, conv['strides'], conv['padding'],
                                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return {'fwd': jax.jit(lambda x, kernel, dy: forward(x, kernel)),
          'dx': jax.jit(lambda x, kernel, dy: jax.vjp(lambda x: forward(x, kernel), x)[1](dy)[0]),
          'dw': jax.jit(lambda x, kernel, dy: jax.vjp(lambda k: forward(x, k), kernel)[1](dy)[0])}


def jax_convolution(conv: dict, calls: int) -> dict:
  """JAX's side of `torch_convolution`: {pass: median seconds of `calls` timed calls after one untimed}."""
  import jax  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], conv['lhs'])
  kernel = jax.random.normal(keys[1], conv['rhs']) / (conv['rhs'][0] * conv['rhs'][1] * conv['rhs'][2]) ** 0.5
  passes = jax_passes(conv)
  dy = jax.random.normal(keys[2], jax.eval_shape(passes['fwd'], x, kernel, None).shape)
  return {name: torch_worker.median_seconds(lambda: jax.block_until_ready(fn(x, kernel, dy)), calls)
          for name, fn in passes.items()}


def totals(convs: list[dict], side: str) -> dict:
  """Seconds of the network's convolutions per train step and per forward on one side ('jax' or 'torch')."""
  train = sum(c['count'] * sum(c[side][p] for p in PASSES) - (c[side]['dx'] if c['first'] else 0) for c in convs)
  return {'train': train, 'forward': sum(c['count'] * c[side]['fwd'] for c in convs)}


def table(name: str, convs: list[dict], with_torch: bool) -> str:
  """The markdown section of one model: a row per distinct convolution, then the totals."""
  ratio = lambda a, b: f'{a / b:.2f}'
  ms = lambda c, side: ' / '.join(f'{1e3 * c[side][p]:.2f}' for p in PASSES) if side in c else ''
  lines = [f'### {name}', '',
           '| input (H x W x C) | kernel -> C_out | stride | in the network | JAX ms (fwd / dx / dw) | '
           'PyTorch ms (fwd / dx / dw) | JAX/PyTorch (sum of the three) |',
           '|---|---|---|---|---|---|---|']
  for c in convs:
    _, h, w, ch = c['lhs']
    kh, kw, _, out = c['rhs']
    both = [sum(c[side][p] for p in PASSES) for side in ('jax', 'torch') if side in c]
    lines.append(f'| {h}x{w}x{ch} | {kh}x{kw} -> {out} | {c["strides"][0]} | {c["count"]}x'
                 f'{" (first)" if c["first"] else ""} | {ms(c, "jax")} | {ms(c, "torch")} | '
                 f'{ratio(*both) if with_torch else ""} |')
  jax_total = totals(convs, 'jax')
  lines.append('')
  for op in ('train', 'forward'):
    line = f'- all convolutions of a {op} {"step" if op == "train" else "pass"}: JAX {jax_total[op]:.3f} s'
    if with_torch:
      torch_total = totals(convs, 'torch')[op]
      line += f', PyTorch {torch_total:.3f} s, JAX/PyTorch {ratio(jax_total[op], torch_total)}'
    lines.append(line)
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for flag in ('batch', 'calls', 'rounds', 'threads'):
    if FLAGS[flag].value < 1:
      raise app.UsageError(f'--{flag} must be >= 1, got {FLAGS[flag].value}.')
  configs = {name: harness.load_config(name) for name in FLAGS.models}
  for name, config in configs.items():
    config.training.batch_size = FLAGS.batch
    config.cpu_kernels = FLAGS.cpu_kernels or config.cpu_kernels
    if config.model.dtype != 'float32':
      raise app.UsageError(f'configs/{name}.py computes in {config.model.dtype}; this measures float32 only.')
  for setting in ('cpu_scheduler', 'cpu_kernels'):
    values = {config[setting] for config in configs.values()}
    if len(values) > 1:
      raise app.UsageError(f'The configs ask for different {setting} ({sorted(values)}); measure them in '
                           'separate runs.')
  with_torch = FLAGS.torch_python != 'none'
  if with_torch and not os.path.exists(FLAGS.torch_python):
    raise app.UsageError(f'No Python at --torch_python={FLAGS.torch_python}; {TORCHENV_HINT}, or pass '
                         '--torch_python=none for the JAX columns only.')
  settings = next(iter(configs.values())).copy_and_resolve_references()
  settings.num_cpu_devices = 1  # One device, as one shard of a train step runs its convolutions.
  xla_cpu.set_flags(settings)  # The train step's XLA:CPU settings.
  import jax  # pylint: disable=g-import-not-at-top

  worker = None
  try:
    if with_torch:  # Started before JAX's backend and its threads.
      env = dict(os.environ, OMP_NUM_THREADS=str(FLAGS.threads))
      worker = Worker('pytorch', [FLAGS.torch_python, os.path.abspath(__file__), '--torch_worker'], env,
                      tempfile.mkdtemp(prefix='conv_kernels_'))
    xla_cpu.tune(settings)  # The library of the convolutions, on the CPU.
    torch_device = FLAGS.torch_device
    if torch_device == 'auto':
      torch_device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
    if worker and torch_device == 'cuda' and not worker.hello['cuda']:
      sys.exit(f'bench/conv_kernels.py: PyTorch under {FLAGS.torch_python} has no CUDA; pass --torch_device=cpu '
               'or a --torch_python with CUDA.')
    sections, figures = [], {}
    for name, config in configs.items():
      convs = model_convolutions(config)
      progress(f'{name}: {len(convs)} distinct convolutions, {sum(c["count"] for c in convs)} in the network')
      runs = collections.defaultdict(list)
      for round_ in range(FLAGS.rounds):
        for i, conv in enumerate(convs):
          progress(f'{name}: round {round_ + 1}/{FLAGS.rounds}, convolution {i + 1}/{len(convs)}')
          runs['jax', i].append(jax_convolution(conv, FLAGS.calls))
          if worker:
            request = {k: conv[k] for k in ('lhs', 'rhs', 'strides', 'padding')}
            runs['torch', i].append(worker.call('conv', timeout=600, calls=FLAGS.calls, threads=FLAGS.threads,
                                                device=torch_device, **request))
      for (side, i), answers in runs.items():
        convs[i][side] = {p: statistics.median(a[p] for a in answers) for p in PASSES}
      sections.append(table(name, convs, with_torch))
      figures[name] = {'convolutions': convs, 'jax': totals(convs, 'jax')}
      if with_torch:
        figures[name]['torch'] = totals(convs, 'torch')
  except WorkerError as e:
    sys.exit(f'bench/conv_kernels.py: {e}')
  finally:
    if worker:
      worker.close()
  device, machine = jax.devices()[0], harness.machine_description()
  header = [
      '# A U-Net\'s convolutions one at a time: JAX vs PyTorch', '',
      f'- command: `{shlex.join([os.path.relpath(sys.executable, REPO), *sys.argv])}`',
      f'- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}',
      f'- machine: {machine}',
      f'- JAX {jax.__version__} on {device.platform} ({device.device_kind}), XLA_FLAGS: '
      f'`{os.environ.get("XLA_FLAGS", "")}`, convolutions on {xla_cpu.kernels()}'
      + (f'; PyTorch {worker.hello["torch"]} on {torch_device}, {FLAGS.threads} threads, NCHW'
         if worker else '; PyTorch: not run (--torch_python=none)'),
      f'- batch {FLAGS.batch}, float32, no bias; per pass the median of {FLAGS.calls} calls back to back, then '
      f'the median of {FLAGS.rounds} rounds alternating JAX and PyTorch per convolution', '']
  text = '\n'.join(header) + '\n' + '\n\n'.join(sections)
  print(text)
  results_lib.write(FLAGS.out_dir, 'conv_kernels', text, {
      'machine': machine, 'jax': jax.__version__, 'device_kind': device.device_kind,
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'cpu_kernels': xla_cpu.kernels(),
      'torch_device': torch_device if worker else None,
      'batch': FLAGS.batch, 'models': figures})


if __name__ == '__main__':
  app.run(main)
