"""This project's U-Net against the PyTorch peer (diffusers `UNet2DModel`, same network), alternating, in one run.

  python bench/vs_pytorch.py                                   # CIFAR-10 and MNIST models, batch 16 and 128
  python bench/vs_pytorch.py --models=mnist --batches=2 --ops=train,forward,sample --repeats=2 --sample_steps=3
  python bench/vs_pytorch.py --models=cifar10 --batches=16 --ops=sample --sample_steps=50 --repeats=1

The PyTorch side needs a side environment (never the project's venv), by default /tmp/torchenv:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 diffusers

For every (model, op, batch) the script starts two fresh worker processes, a JAX one (bench/jax_worker.py,
in this venv) and a PyTorch one (bench/torch_worker.py under --torch_python), builds the same
network in both (parameter counts are asserted equal), compiles / warms up, and then alternates timed calls:
one JAX call, one PyTorch call, --repeats times, so that machine noise hits both sides alike; each timed call
follows --lead_calls untimed calls of its own side, back to back as the steps of a training loop. Each call is
timed inside its worker (no IPC in the figure). It prints per-configuration medians, the ratio, peak
memory and achieved FLOP/s (and, on a GPU or TPU, MFU against the chip's peak) as a markdown table.

Ops: train (the full train step: DDPM eps loss, backward, grad clipping, Adam, EMA), forward (inference),
sample (DDIM with --sample_steps model calls) and ddpm (ancestral sampling, all T model calls).
Models: any configs/<name>.py (cifar10, mnist, default, ...), unconditional, eps / MSE.
"""
import datetime
import os
import shlex
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position  # bench/harness.py.
from harness import GIB, KNOWN_PARAMS, REPO, TORCHENV_HINT, Worker, WorkerError, progress  # pylint: disable=g-import-not-at-top,wrong-import-position
import results as results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position  # bench/results.py.
sys.path.insert(0, REPO)
from diffusion_jax import perf, xla_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['cifar10', 'mnist'], 'Config names under configs/ (e.g. cifar10, mnist, default).')
flags.DEFINE_list('batches', ['16', '128'], 'Global batch sizes (train, forward and sampling).')
flags.DEFINE_list('ops', ['train', 'forward'], 'Any of train, forward, sample (DDIM, --sample_steps), ddpm (all T).')
flags.DEFINE_integer('repeats', 3, 'Timed calls per side and configuration (alternating JAX, PyTorch).')
flags.DEFINE_integer('warmup', 1, 'Untimed calls per side before timing (after JAX compilation).')
flags.DEFINE_integer('lead_calls', 1, 'Untimed calls of the same side right before each timed call, so that each '
                     'timed call follows its own side\'s as in a training loop: on a 2-core AMD EPYC, JAX\'s first '
                     'CIFAR-10 step after a pause of >= 1 s runs 0.4-1.4 s slower than back to back (PyTorch\'s '
                     'not; docs/performance.md). 0: strict alternation.')
flags.DEFINE_integer('sample_steps', 50, 'DDIM steps of the sample op.')
flags.DEFINE_integer('threads', 2, 'torch.set_num_threads of the PyTorch worker.')
flags.DEFINE_string('torch_python', '/tmp/torchenv/bin/python', 'Python of the side environment with torch, diffusers.')
flags.DEFINE_string('torch_device', 'auto', 'auto (cuda if available, else cpu), cpu or cuda.')
flags.DEFINE_integer('num_cpu_devices', None, 'JAX CPU devices (default: the config\'s num_cpu_devices; -1: one '
                     'per core dividing the batch). Ignored on accelerators.')
flags.DEFINE_enum('cpu_scheduler', None, xla_cpu.SCHEDULERS,
                  'XLA:CPU op scheduler of the JAX side (default: the config\'s cpu_scheduler).')
flags.DEFINE_enum('cpu_kernels', None, xla_cpu.CPU_KERNELS, 'Kernels of the JAX side\'s convolutions and matrix '
                  'products on the CPU (default: the config\'s cpu_kernels).')
flags.DEFINE_integer('grad_accum_steps', 0, 'training.grad_accum_steps of the JAX train step: the same update from '
                     'this many micro-batches; 0: the project\'s automatic choice (on a CPU, micro-batches of 16 for '
                     'per-device batches that are multiples of 16 above 32), 1: the whole batch. The PyTorch '
                     'side always does one whole-batch step.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype: model.dtype on the JAX side, '
                  'torch.autocast on the PyTorch side; parameters stay float32 on both.')
flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of one device for MFU (0: diffusion_jax/perf.py\'s table by device kind).')
flags.DEFINE_integer('seed', 0, 'Seed of parameters and inputs.')
flags.DEFINE_string('out_dir', results_lib.DEFAULT_DIR, 'Folder for the table (vs_pytorch.md) and the figures '
                    '(vs_pytorch.json) of the run; \'\' for none.')

OP_NAMES = {'train': 'train', 'forward': 'forward', 'sample': 'ddim', 'ddpm': 'ddpm'}


# ------------------------------------------------------------------------------------------------------------
# The driver.
# ------------------------------------------------------------------------------------------------------------
def check_torch_python(path: str) -> None:
  if not (os.path.isfile(path) and os.access(path, os.X_OK)):
    sys.exit(f'vs_pytorch: --torch_python={path} does not exist or is not executable; {TORCHENV_HINT}.')


def measure(name: str, config, op: str, batch: int, log_dir: str) -> dict:
  """Times one (model, op, batch) in fresh JAX and PyTorch workers, alternating; returns the results."""
  jax_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
  torch_env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'PYTHONHOME')}
  workers = []
  try:
    jax_side = Worker('jax', [sys.executable, os.path.join(REPO, 'bench', 'jax_worker.py')], jax_env, log_dir)
    workers.append(jax_side)
    torch_side = Worker('torch', [FLAGS.torch_python, os.path.join(REPO, 'bench', 'torch_worker.py')],
                        torch_env, log_dir)
    workers.append(torch_side)
    start = time.perf_counter()
    built = jax_side.call('build', model=name, batch=batch, op_name=OP_NAMES[op], sample_steps=FLAGS.sample_steps,
                          num_cpu_devices=FLAGS.num_cpu_devices, cpu_scheduler=FLAGS.cpu_scheduler,
                          cpu_kernels=FLAGS.cpu_kernels, dtype=FLAGS.dtype,
                          grad_accum_steps=FLAGS.grad_accum_steps if op == 'train' else 1,
                          seed=FLAGS.seed)
    jax_build_seconds = time.perf_counter() - start
    timesteps = {k: built.get(k) for k in ('timesteps', 'prev_timesteps', 'eta', 'clip_x0')}
    start = time.perf_counter()
    torch_built = torch_side.call(
        'build', unet=harness.diffusers_unet_kwargs(config), op_name=OP_NAMES[op], batch=batch,
        image_size=built['image_size'], channels=built['channels'],
        padded_size=harness.padded_size(built['image_size'], len(config.model.ch_mult)),
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
      for side, worker in (('jax', jax_side), ('torch', torch_side)):
        for _ in range(FLAGS.lead_calls):
          worker.call('run')
        times[side].append(worker.call('run')['seconds'])
      progress(f'  repeat {i + 1}/{FLAGS.repeats}: JAX {times["jax"][-1]:.3f} s, PyTorch {times["torch"][-1]:.3f} s')
    foreign = foreign_cpu_share(ticks_before, cpu_ticks(pids), time.perf_counter() - start)
    steady_memory = {'jax': jax_side.call('memory'), 'torch': torch_side.call('memory')}
  finally:
    for w in workers:
      w.close()
  result = dict(model=name, op=label, batch=batch, params=built['params'], flops=built['flops'],
                num_devices=built['num_devices'], platform=built['platform'], device_kind=built['device_kind'],
                jax_version=built['jax_version'], xla_flags=built['xla_flags'],
                cpu_kernels=built['cpu_kernels'], torch_hello=torch_side.hello,
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
           *([] if accelerator else [f'- XLA:CPU: XLA_FLAGS `{first["xla_flags"]}`, convolutions and matrix products '
                                     f'on {first["cpu_kernels"]}']),
           f'- {FLAGS.warmup} warm-up and {FLAGS.repeats} timed calls per side, alternating JAX then PyTorch, '
           f'each timed call right after {FLAGS.lead_calls} untimed call(s) of its own side; medians; fresh worker '
           'processes per row']
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
      top = perf.peak_flops(r['device_kind'], FLAGS.dtype, FLAGS.peak_tflops)
      top = top and top * r['num_devices']
      mfu = lambda s: f'{100 * r["flops"] / s / top:.1f}%' if top else 'n/a'
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
    top = perf.peak_flops(first['device_kind'], FLAGS.dtype, FLAGS.peak_tflops)
    lines.append(f'- MFU: achieved FLOP/s over a dense peak of {top and top / 1e12} TFLOP/s per device ({FLAGS.dtype}, '
                 f'{first["device_kind"]}; --peak_tflops overrides; diffusion_jax/perf.py: H100 SXM / H200 989 '
                 'bfloat16, 494 TF32 for float32).')
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
  bad_ops = [op for op in FLAGS.ops if op not in OP_NAMES]
  if bad_ops:
    raise app.UsageError(f'Unknown --ops {bad_ops}; choose from {list(OP_NAMES)}.')
  try:
    batches = [int(b) for b in FLAGS.batches]
  except ValueError as e:
    raise app.UsageError(f'--batches must be integers, got {FLAGS.batches}.') from e
  if FLAGS.repeats < 1 or FLAGS.warmup < 0 or FLAGS.lead_calls < 0 or FLAGS.sample_steps < 1:
    raise app.UsageError(f'--repeats ({FLAGS.repeats}) and --sample_steps ({FLAGS.sample_steps}) must be >= 1, '
                         f'--warmup ({FLAGS.warmup}) and --lead_calls ({FLAGS.lead_calls}) >= 0.')
  check_torch_python(FLAGS.torch_python)
  configs = {name: harness.load_config(name) for name in FLAGS.models}
  for config in configs.values():
    harness.diffusers_unet_kwargs(config)  # Raises for configs the PyTorch side cannot reproduce.
  command = shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(REPO) else 'python',
                        os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
  started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
  machine = harness.machine_description()
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
