"""A U-Net's convolutions one at a time, JAX against PyTorch, side by side: where a train step's kernel time goes.

  python bench/conv_kernels.py                                  # configs/cifar10.py and mnist.py, batch 16
  python bench/conv_kernels.py --models=default --batch=32 --calls=5 --rounds=2

Convolutions are most of a train step on a CPU (docs/performance.md). For each distinct convolution of a
config's U-Net (read from the jaxpr of its forward: input and kernel shapes, strides, padding) this times its
forward, input gradient and kernel gradient in JAX, in this process with the train step's XLA settings
(xla_cpu.set_flags), and in PyTorch in a worker process (bench/torch_worker.py's protocol; NCHW float32 as
diffusers runs, conv2d and aten's convolution_backward), alternating JAX and PyTorch per convolution, --rounds
times; medians. Then it sums them over the network as a train step runs them (every forward and kernel
gradient, every input gradient but the first convolution's: the images need none) and as a forward does.
Neither side adds a bias. Prints one table per model, writes bench/results/conv_kernels.md and .json.

The PyTorch side needs the side environment of bench/vs_pytorch.py (/tmp/torchenv, see there).
"""
import os
import sys
import time

PASSES = ('fwd', 'dx', 'dw')  # Forward, input gradient, kernel gradient.


def torch_convolution(r: dict) -> dict:
  """The PyTorch worker's `conv` request: {"lhs": NHWC shape, "rhs": HWIO shape, "strides", "padding": [[lo, hi],
  [lo, hi]], "calls", "threads", "device": auto | cpu | cuda} -> {pass: median seconds of `calls` timed calls
  after one untimed, the device's work done; "device"}."""
  import statistics  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(r['threads'])
  device = torch.device(r['device'] if r['device'] != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu')
  torch.backends.cudnn.benchmark = True  # Picks the fastest algorithm per shape, as XLA autotunes on GPUs.
  wait = torch.cuda.synchronize if device.type == 'cuda' else lambda: None
  n, h, w, c = r['lhs']
  kh, kw, _, out = r['rhs']
  (top, bottom), (left, right) = r['padding']
  generator = torch.Generator().manual_seed(0)
  x = torch.randn(n, c, h, w, generator=generator).to(device)
  kernel = (torch.randn(out, c, kh, kw, generator=generator) / (kh * kw * c) ** 0.5).to(device)
  symmetric = top == bottom and left == right
  if not symmetric:  # conv2d pads symmetrically: pad first (part of the timed call), then no padding.
    x = F.pad(x, (left, right, top, bottom))
  padding = [top, left] if symmetric else [0, 0]
  with torch.no_grad():
    y = F.conv2d(x, kernel, stride=r['strides'], padding=padding)
  dy = torch.randn(y.shape, generator=generator).to(device)
  backward = lambda mask: torch.ops.aten.convolution_backward(dy, x, kernel, None, r['strides'], padding, [1, 1],
                                                              False, [0, 0], 1, mask)
  calls = {'fwd': lambda: F.conv2d(x, kernel, stride=r['strides'], padding=padding),
           'dx': lambda: backward([True, False, False]), 'dw': lambda: backward([False, True, False])}
  answer = {'device': str(device)}
  with torch.no_grad():
    for name in PASSES:
      calls[name]()
      wait()
      times = []
      for _ in range(r['calls']):
        start = time.perf_counter()
        calls[name]()
        wait()
        times.append(time.perf_counter() - start)
      answer[name] = statistics.median(times)
  return answer


def torch_worker_main() -> None:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch  # pylint: disable=g-import-not-at-top
  import torch_worker  # pylint: disable=g-import-not-at-top  # bench/torch_worker.py: the protocol.
  torch_worker.serve({'conv': torch_convolution}, {'torch': torch.__version__})


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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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
flags.DEFINE_enum('torch_device', 'auto', ['auto', 'cpu', 'cuda'], 'auto: cuda if PyTorch has it, else cpu.')
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
          if hasattr(sub, 'eqns'):
            visit(sub)
          elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
            visit(sub.jaxpr)

  visit(jaxpr.jaxpr)
  return list(found.values())


def jax_convolution(conv: dict, calls: int) -> dict:
  """JAX's side of `torch_convolution`: {pass: median seconds}, each pass its own compiled program."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], conv['lhs'])
  kernel = jax.random.normal(keys[1], conv['rhs']) / (conv['rhs'][0] * conv['rhs'][1] * conv['rhs'][2]) ** 0.5
  forward = lambda x, kernel: lax.conv_general_dilated(x, kernel, conv['strides'], conv['padding'],
                                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  dy = jax.random.normal(keys[2], jax.eval_shape(forward, x, kernel).shape)
  programs = {'fwd': (jax.jit(forward), (x, kernel)),
              'dx': (jax.jit(lambda x, kernel, dy: jax.vjp(lambda x: forward(x, kernel), x)[1](dy)[0]), (x, kernel, dy)),
              'dw': (jax.jit(lambda x, kernel, dy: jax.vjp(lambda k: forward(x, k), kernel)[1](dy)[0]), (x, kernel, dy))}
  answer = {}
  for name, (fn, args) in programs.items():
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    answer[name] = statistics.median(times)
  return answer


def totals(convs: list[dict], side: str) -> dict:
  """Seconds of the network's convolutions per train step and per forward on one side ('jax' or 'torch')."""
  train = sum(c['count'] * sum(c[side][p] for p in PASSES) - (c[side]['dx'] if c['first'] else 0) for c in convs)
  return {'train': train, 'forward': sum(c['count'] * c[side]['fwd'] for c in convs)}


def table(name: str, convs: list[dict], with_torch: bool) -> str:
  ratio = lambda a, b: f'{a / b:.2f}' if with_torch else ''
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
  for config in configs.values():
    config.training.batch_size = FLAGS.batch
  with_torch = FLAGS.torch_python != 'none'
  if with_torch and not os.path.exists(FLAGS.torch_python):
    raise app.UsageError(f'No Python at --torch_python={FLAGS.torch_python}; {TORCHENV_HINT}, or pass '
                         '--torch_python=none for the JAX columns only.')
  xla_cpu.set_flags(next(iter(configs.values())))  # The train step's XLA:CPU settings; all configs share them.
  import jax  # pylint: disable=g-import-not-at-top

  worker = None
  try:
    if with_torch:  # Started before JAX's backend and its threads.
      env = dict(os.environ, OMP_NUM_THREADS=str(FLAGS.threads))
      worker = Worker('pytorch', [FLAGS.torch_python, os.path.abspath(__file__), '--torch_worker'], env,
                      tempfile.mkdtemp(prefix='conv_kernels_'))
    jax.config.update('jax_default_device', jax.local_devices()[0])  # One device, as a train step's shard.
    sections, figures, torch_device = [], {}, None
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
                                                device=FLAGS.torch_device, **request))
      for (side, i), answers in runs.items():
        convs[i][side] = {p: statistics.median(a[p] for a in answers) for p in PASSES}
        torch_device = answers[0].get('device', torch_device)
      sections.append(table(name, convs, with_torch))
      figures[name] = {'convolutions': convs, 'jax': totals(convs, 'jax')}
      if with_torch:
        figures[name]['torch'] = totals(convs, 'torch')
  except WorkerError as e:
    sys.exit(f'bench/conv_kernels.py: {e}')
  finally:
    if worker:
      worker.close()
  device = jax.devices()[0]
  header = [
      '# A U-Net\'s convolutions one at a time: JAX vs PyTorch', '',
      f'- command: `{shlex.join([os.path.relpath(sys.executable, REPO), *sys.argv])}`',
      f'- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}',
      f'- machine: {harness.machine_description()}',
      f'- JAX {jax.__version__} on {device.platform} ({device.device_kind}), XLA_FLAGS: '
      f'`{os.environ.get("XLA_FLAGS", "")}`' + (f'; PyTorch {worker.hello["torch"]} on {torch_device}, '
                                                f'{FLAGS.threads} threads, NCHW'
                                                if worker else '; PyTorch: not run (--torch_python=none)'),
      f'- batch {FLAGS.batch}, float32, no bias; per pass the median of {FLAGS.calls} calls back to back, then '
      f'the median of {FLAGS.rounds} rounds alternating JAX and PyTorch per convolution', '']
  text = '\n'.join(header) + '\n' + '\n\n'.join(sections)
  print(text)
  results_lib.write(FLAGS.out_dir, 'conv_kernels', text, {
      'machine': harness.machine_description(), 'jax': jax.__version__, 'device_kind': device.device_kind,
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'torch_device': torch_device, 'batch': FLAGS.batch,
      'models': figures})


if __name__ == '__main__':
  app.run(main)
