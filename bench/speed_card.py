"""The speed card of a config on the backend JAX finds (GPU, TPU or CPU), side by side with diffusers in PyTorch.

  python bench/speed_card.py                    # Ho et al.'s CIFAR-10 model (35.7M), batch 128, float32 and bfloat16
  python bench/speed_card.py --find_max_batch   # also the largest train batch that fits (doubling; compiles each)
  python bench/speed_card.py --smoke            # a tiny model and 2 steps: checks the script itself in seconds

In one run it measures, for each compute dtype (`model.dtype`; float32 runs at XLA's default precision, TF32 on
NVIDIA GPUs):
  - our train step (built by experiment.build and train.make_train_step, as main.py builds a run) at --batch:
    steps/s, images/s, compile time, peak device memory, TFLOP/s and MFU (FLOPs from XLA's cost analysis of the
    step, over the device's dense peak from diffusion_jax/perf.py, or --peak_tflops);
  - our forward at --batch, and sampling (DDIM-50, DPM-Solver++(2M)-20) at --sample_batch: images/s and the wall
    time that implies for the 50,000 samples of an FID evaluation;
  - the same train step and forward of diffusers' UNet2DModel with the same architecture (parameter counts
    asserted equal) in PyTorch, eager (autocast for bfloat16, channels_last) and torch.compile'd, on the same
    device (bench/torch_worker.py).
Each side runs in its own fresh worker process (bench/jax_worker.py, bench/torch_worker.py), one after the
other, so that each has the device to itself and its own memory peak; JAX compiles without a compilation cache.
The table is printed and written with the figures (date, device, versions, command) to --out_dir as
speed_card.md and speed_card.json.

Inputs are synthetic batches of the config's shape: no dataset, TensorFlow or network is needed. On a machine
with JAX, flax, optax, orbax-checkpoint, torch and numpy alone, the few pure-Python extras (ml-collections, clu,
diffusers, ...) can be installed from wheels copied beside the repository (bench/README.md).
"""
import datetime
import importlib.metadata
import importlib.util
import os
import shlex
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position  # bench/harness.py.
from harness import GIB, REPO, Worker, WorkerError, WorkerTimeout, progress  # pylint: disable=g-import-not-at-top,wrong-import-position
import results as results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position  # bench/results.py.
sys.path.insert(0, REPO)
from diffusion_jax import perf  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string('config', 'cifar10', 'Config name under configs/ (the smoke mode uses tiny).')
flags.DEFINE_integer('batch', 128, 'Global batch of the train step and the forward.')
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes (model.dtype) to measure.')
flags.DEFINE_integer('steps', 50, 'Timed train steps (and forward calls) per row, after the warm-up.')
flags.DEFINE_integer('warmup', 5, 'Untimed calls per row after compilation (torch.compile compiles in them).')
flags.DEFINE_integer('sample_batch', 1000, 'Images per sampling call.')
flags.DEFINE_list('samplers', ['ddim:50', 'dpm++2m:20'], 'Samplers to time, METHOD:STEPS (ddim, dpm++2m).')
flags.DEFINE_integer('sample_calls', 2, 'Timed sampling calls per sampler, after one untimed call.')
flags.DEFINE_integer('fid_samples', 50_000, 'Samples of the FID evaluation whose wall time the table states.')
flags.DEFINE_string('torch_python', 'auto', "Python with torch and diffusers for the PyTorch rows: auto (this one if "
                    "it has both, else /tmp/torchenv/bin/python if it exists), a path, or 'none'.")
flags.DEFINE_list('torch_modes', ['eager', 'compile'], 'PyTorch rows: eager (channels_last, autocast) and compile.')
flags.DEFINE_integer('torch_compile_timeout', 900, 'Seconds a torch.compile warm-up may take before the row is '
                     'given up (the worker is stopped and the card says so).')
flags.DEFINE_bool('find_max_batch', False, 'Also double the train batch until it no longer fits (or --max_batch), '
                  'a fresh worker and a compilation per try.')
flags.DEFINE_integer('max_batch', 8192, 'Largest train batch that --find_max_batch tries.')
flags.DEFINE_float('peak_tflops', 0.0, 'Dense peak TFLOP/s of one device for MFU (0: diffusion_jax/perf.py by '
                   'device kind; none on CPUs).')
flags.DEFINE_bool('remat', False, 'model.remat of the JAX side (rematerialized blocks: less memory, more compute).')
flags.DEFINE_bool('smoke', False, 'A tiny model, batch 8, 2 steps, 4-step samplers: checks the script in seconds.')
flags.DEFINE_integer('seed', 0, 'Seed of parameters and inputs.')
flags.DEFINE_string('out_dir', results_lib.DEFAULT_DIR, "Folder for speed_card.md and speed_card.json ('' for none).")

TORCH_HINT = ('--torch_python=none skips them; or give a Python with torch and diffusers (on a GPU machine, '
              'diffusers can be installed from its wheel: bench/README.md)')


def settings() -> dict:
  """The run's settings from the flags (the smoke mode replaces the sizes)."""
  s = dict(config=FLAGS.config, batch=FLAGS.batch, steps=FLAGS.steps, warmup=FLAGS.warmup,
           sample_batch=FLAGS.sample_batch, samplers=FLAGS.samplers, sample_calls=FLAGS.sample_calls)
  if FLAGS.smoke:
    s.update(config='tiny', batch=8, steps=2, warmup=1, sample_batch=8, samplers=['ddim:4', 'dpm++2m:4'],
             sample_calls=1)
  return s


def parse_samplers(specs: list[str]) -> list[tuple[str, int]]:
  out = []
  for spec in specs:
    method, _, steps = spec.partition(':')
    if method not in ('ddim', 'dpm++2m') or not steps.isdigit() or int(steps) < 1:
      raise app.UsageError(f'--samplers entry {spec!r} must be ddim:STEPS or dpm++2m:STEPS with STEPS >= 1.')
    out.append((method, int(steps)))
  return out


def find_torch_python(choice: str) -> str | None:
  """The Python of the PyTorch worker, or None for no PyTorch rows."""
  if choice == 'none':
    return None
  if choice != 'auto':
    if not (os.path.isfile(choice) and os.access(choice, os.X_OK)):
      raise app.UsageError(f'--torch_python={choice} does not exist or is not executable; {TORCH_HINT}.')
    return choice
  if importlib.util.find_spec('torch') and importlib.util.find_spec('diffusers'):
    return sys.executable
  side = '/tmp/torchenv/bin/python'
  return side if os.path.isfile(side) else None


def timed(worker: Worker, calls: int, warmup: int, timeout: float | None = None) -> tuple[float, float | None]:
  """(seconds per call over `calls` calls in a row, seconds of the first warm-up call) after `warmup` untimed
  calls, the first of which must answer within timeout."""
  first = None
  for i in range(warmup):
    seconds = worker.call('run', timeout=timeout if i == 0 else None)['seconds']
    first = seconds if first is None else first
  return worker.call('run', calls=calls)['seconds'] / calls, first


def peak_memory(worker: Worker) -> float:
  """The worker's peak device memory in bytes (its peak resident memory on a CPU)."""
  stats = worker.call('memory')
  return stats.get('device_peak') or stats['rss_peak']


def jax_rows(s: dict, dtype: str, log_dir: str, env: dict) -> tuple[list[dict], dict]:
  """Train, forward and sampling rows of our U-Net in one fresh worker; also the train build's reply."""
  worker = Worker(f'jax_{dtype}', [sys.executable, os.path.join(REPO, 'bench', 'jax_worker.py')], env, log_dir)
  common = dict(model=s['config'], dtype=dtype, seed=FLAGS.seed, grad_accum_steps=1, sample_steps=1,
                overrides={'model.remat': FLAGS.remat})
  rows = []
  try:
    built = worker.call('build', op_name='train', batch=s['batch'], **common)
    progress(f'JAX {dtype} train step, batch {s["batch"]}: {built["params"]:,} parameters on {built["device_kind"]}, '
             f'compiled in {built["compile_seconds"]:.1f} s')
    seconds, _ = timed(worker, s['steps'], s['warmup'])
    rows.append(dict(framework='JAX', op='train', dtype=dtype, batch=s['batch'], seconds=seconds,
                     compile_seconds=built['compile_seconds'], flops=built['flops'], peak_bytes=peak_memory(worker)))
    forward = worker.call('build', op_name='forward', batch=s['batch'], **common)
    rows.append(dict(framework='JAX', op='forward', dtype=dtype, batch=s['batch'],
                     seconds=timed(worker, s['steps'], s['warmup'])[0], compile_seconds=forward['compile_seconds'],
                     flops=forward['flops']))
    for method, steps in parse_samplers(s['samplers']):
      sampler = worker.call('build', op_name=method, batch=s['sample_batch'], **dict(common, sample_steps=steps))
      rows.append(dict(framework='JAX', op=f'{"DDIM" if method == "ddim" else "DPM-Solver++(2M)"}-{steps}',
                       dtype=dtype, batch=s['sample_batch'], seconds=timed(worker, s['sample_calls'], 1)[0],
                       compile_seconds=sampler['compile_seconds'], flops=sampler['flops'],
                       model_calls=len(sampler['timesteps'])))
      progress(f'  {rows[-1]["op"]}: {rows[-1]["batch"] / rows[-1]["seconds"]:.0f} images/s')
  finally:
    worker.close()
  return rows, built


def torch_rows(s: dict, dtype: str, mode: str, built: dict, jax_flops: dict, config, python: str, log_dir: str,
               env: dict) -> list[dict]:
  """Train and forward rows of diffusers' UNet2DModel (same network) in one fresh PyTorch worker; jax_flops: op ->
  the FLOPs of our program for the same work, which the PyTorch rows share."""
  worker = Worker(f'torch_{mode}_{dtype}', [python, os.path.join(REPO, 'bench', 'torch_worker.py')], env, log_dir)
  rows = []
  try:
    for op in ('train', 'forward'):
      torch_built = worker.call(
          'build', unet=harness.diffusers_unet_kwargs(config), op_name=op, batch=s['batch'],
          image_size=built['image_size'], channels=built['channels'],
          padded_size=harness.padded_size(built['image_size'], len(config.model.ch_mult)),
          alphas_cumprod=built['alphas_cumprod'], betas=built['betas'], optim=built['optim'],
          ema_decay=built['ema_decay'], threads=len(os.sched_getaffinity(0)), device='auto', dtype=dtype,
          seed=FLAGS.seed, channels_last=True, compile=mode == 'compile')
      if torch_built['params'] != built['params']:
        raise WorkerError(f'The networks differ: {built["params"]:,} parameters in JAX, {torch_built["params"]:,} '
                          'in PyTorch.')
      worker.call('reset_peak')
      row = dict(framework=f'PyTorch {mode}', op=op, dtype=dtype, batch=s['batch'], device=torch_built['device'],
                 flops=jax_flops[op])
      try:
        row['seconds'], first = timed(worker, s['steps'], max(s['warmup'], 1),
                                      FLAGS.torch_compile_timeout if mode == 'compile' else None)
      except WorkerTimeout:
        rows.append(dict(row, failed=f'torch.compile took over {FLAGS.torch_compile_timeout} s'))
        return rows
      if mode == 'compile':
        row['compile_seconds'] = first  # The first call compiles (and runs once).
      if op == 'train':
        row['peak_bytes'] = peak_memory(worker)
      rows.append(row)
      progress(f'PyTorch {mode} {dtype} {op}, batch {s["batch"]}: {s["batch"] / row["seconds"]:.0f} images/s')
  finally:
    worker.close()
  return rows


def max_batch_row(s: dict, dtype: str, log_dir: str, env: dict) -> dict | None:
  """The largest train batch (doubling from --batch) that compiles and runs, with its speed."""
  best, batch = None, 2 * s['batch']
  while batch <= FLAGS.max_batch:
    worker = Worker(f'jax_max_{dtype}_{batch}', [sys.executable, os.path.join(REPO, 'bench', 'jax_worker.py')], env,
                    log_dir)
    try:
      built = worker.call('build', model=s['config'], op_name='train', batch=batch, dtype=dtype, seed=FLAGS.seed,
                          grad_accum_steps=1, sample_steps=1, overrides={'model.remat': FLAGS.remat})
      seconds, _ = timed(worker, max(2, s['steps'] // 5), 1)
      best = dict(framework='JAX', op='train (largest batch)', dtype=dtype, batch=batch, seconds=seconds,
                  compile_seconds=built['compile_seconds'], flops=built['flops'], peak_bytes=peak_memory(worker))
      progress(f'JAX {dtype} train step fits batch {batch}: {batch / seconds:.0f} images/s')
    except WorkerError as e:
      progress(f'JAX {dtype} train step at batch {batch} fails ({str(e).splitlines()[-1][:120]}); stopping there.')
      break
    finally:
      worker.close()
    batch *= 2
  return best


def versions(python: str | None) -> dict:
  import jax  # pylint: disable=g-import-not-at-top  # Imported here only: the driver itself uses no device.
  out = {'python': sys.version.split()[0], 'jax': jax.__version__}
  for name in ('jaxlib', 'flax', 'optax', 'orbax-checkpoint'):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = 'n/a'
  if python:
    out['torch_python'] = python
  return out


def report(rows: list[dict], meta: dict, s: dict) -> str:
  """The markdown speed card."""
  device, peak = meta['device_kind'], {d: perf.peak_flops(meta['device_kind'], d, FLAGS.peak_tflops) for d in
                                        FLAGS.dtypes}
  v = meta['versions']
  lines = [f'# Speed card: {meta["config"]} ({meta["params"]:,} parameters) on {meta["num_devices"]} x {device}', '',
           f'- date: {meta["date"]}', f'- command: `{meta["command"]}`', f'- machine: {meta["machine"]}',
           '- versions: ' + ', '.join(f'{k} {val}' for k, val in v.items() if k != 'torch_python')
           + (f'; PyTorch {meta["torch"]["torch"]}, diffusers {meta["torch"]["diffusers"]}' if meta.get('torch')
              else '; PyTorch rows: ' + meta['torch_skipped']),
           f'- {s["warmup"]} warm-up then {s["steps"]} timed calls per train / forward row (one wait at the end); '
           f'sampling: 1 warm-up then {s["sample_calls"]} timed calls of {s["sample_batch"]} images; each side in '
           'its own fresh process, no compilation cache.', '',
           '| framework | op | dtype | batch | steps/s | images/s | compile s | peak GiB | TFLOP/s | MFU | vs JAX |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  jax_of = {(r['op'], r['dtype']): r for r in rows if r['framework'] == 'JAX'}
  for r in rows:
    if 'model_calls' in r:
      continue
    if r.get('failed'):
      lines.append(f'| {r["framework"]} | {r["op"]} | {r["dtype"]} | {r["batch"]} | {r["failed"]} | | | | | | |')
      continue
    rate = 1 / r['seconds']
    tflops = r['flops'] * rate / 1e12
    top = peak[r['dtype']] and peak[r['dtype']] * meta['num_devices']
    twin = jax_of.get((r['op'], r['dtype']))
    cells = [r['framework'], r['op'], r['dtype'], str(r['batch']), f'{rate:.1f}', f'{r["batch"] * rate:.0f}',
             f'{r["compile_seconds"]:.1f}' if 'compile_seconds' in r else '',
             f'{r["peak_bytes"] / GIB:.2f}' if 'peak_bytes' in r else '', f'{tflops:.3g}',
             f'{100 * tflops * 1e12 / top:.1f}%' if top else 'n/a',
             f'{r["seconds"] / twin["seconds"]:.2f}x' if twin and r['framework'] != 'JAX' else '']
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', f'| sampler | dtype | batch | model calls | images/s | {FLAGS.fid_samples:,} samples in |',
            '|---|---|---|---|---|---|']
  for r in rows:
    if 'model_calls' in r:
      rate = r['batch'] / r['seconds']
      lines.append(f'| {r["op"]} | {r["dtype"]} | {r["batch"]} | {r["model_calls"]} | {rate:.0f} | '
                   f'{FLAGS.fid_samples / rate / 60:.1f} min |')
  best = {}
  for r in rows:
    if r['framework'] != 'JAX' and r['op'] == 'train' and 'seconds' in r:
      best[r['dtype']] = min(best.get(r['dtype'], float('inf')), r['seconds'])
  if best:
    lines += ['', 'JAX train step vs the faster PyTorch row (eager or compile), same dtype: ' + ', '.join(
        f'{d} {best[d] / jax_of[("train", d)]["seconds"]:.2f}x' for d in best if ('train', d) in jax_of) +
              ' (above 1: JAX is faster).']
  peaks = ', '.join(f'{d} {p / 1e12:g} TFLOP/s' for d, p in peak.items() if p) or f'none known for {device}: no MFU'
  lines += ['', 'Notes:',
            '- steps/s and images/s: the timed calls in a row, waiting for the last result only (as a training loop '
            'runs). vs JAX: the PyTorch row\'s time over JAX\'s for the same op and dtype (above 1: JAX is faster).',
            '- compile s: JAX lowering and compilation; torch.compile: its first call (compilation and one run).',
            '- float32: XLA\'s default precision (TF32 tensor cores on NVIDIA GPUs, bfloat16 passes on TPUs); '
            'PyTorch\'s defaults (TF32 for convolutions through cuDNN, full float32 matmuls). bfloat16: model.dtype='
            'bfloat16 (parameters, gradients, Adam and EMA in float32) and torch.autocast.',
            f'- TFLOP/s and MFU: FLOPs of XLA\'s cost analysis of our compiled program (the PyTorch rows divide the '
            f'same count by their time) over the dense peak per device ({peaks}; --peak_tflops overrides).',
            '- peak GiB: device memory (JAX memory_stats peak_bytes_in_use; torch.cuda.max_memory_allocated); on a '
            'CPU the worker\'s peak resident memory.']
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  s = settings()
  parse_samplers(s['samplers'])
  bad = [d for d in FLAGS.dtypes if d not in ('float32', 'bfloat16')]
  if bad or not FLAGS.dtypes:
    raise app.UsageError(f'--dtypes must be float32 and/or bfloat16, got {FLAGS.dtypes}.')
  bad = [m for m in FLAGS.torch_modes if m not in ('eager', 'compile')]
  if bad:
    raise app.UsageError(f'--torch_modes must be eager and/or compile, got {FLAGS.torch_modes}.')
  if min(s['batch'], s['steps'], s['sample_batch'], s['sample_calls']) < 1 or s['warmup'] < 0:
    raise app.UsageError('--batch, --steps, --sample_batch and --sample_calls must be >= 1, --warmup >= 0.')
  config = harness.load_config(s['config'])
  python = find_torch_python(FLAGS.torch_python)
  if python:
    harness.diffusers_unet_kwargs(config)  # Raises for configs the PyTorch side cannot reproduce.
  command = shlex.join(['python', os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
  started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
  jax_env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}  # Real compile times.
  torch_env = dict(os.environ) if python == sys.executable else {
      k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'PYTHONHOME')}
  log_dir = tempfile.mkdtemp(prefix='speed_card_')
  rows, torch_hello, built = [], None, None
  try:
    for dtype in FLAGS.dtypes:
      dtype_rows, built = jax_rows(s, dtype, log_dir, jax_env)
      rows += dtype_rows
      jax_flops = {r['op']: r['flops'] for r in dtype_rows}
      if FLAGS.find_max_batch:
        rows += filter(None, [max_batch_row(s, dtype, log_dir, jax_env)])
      for mode in FLAGS.torch_modes if python else ():
        rows += torch_rows(s, dtype, mode, built, jax_flops, config, python, log_dir, torch_env)
    if python:
      probe = Worker('torch_versions', [python, os.path.join(REPO, 'bench', 'torch_worker.py')], torch_env, log_dir)
      torch_hello = probe.hello
      probe.close()
  except WorkerError as e:
    sys.exit(f'speed_card: {e}\n(worker logs in {log_dir})')
  meta = dict(config=s['config'], params=built['params'], device_kind=built['device_kind'],
              platform=built['platform'], num_devices=built['num_devices'], date=started, command=command,
              machine=harness.machine_description(), versions=versions(python), torch=torch_hello,
              torch_skipped='none (--torch_python=none)' if FLAGS.torch_python == 'none' else
              'none (no Python with torch and diffusers found; ' + TORCH_HINT + ')')
  table = report(rows, meta, s)
  print(table)
  results_lib.write(FLAGS.out_dir, 'speed_card', table, dict(meta, settings=s, rows=rows))


if __name__ == '__main__':
  app.run(main)
