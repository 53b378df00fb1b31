"""XLA:CPU tuning: the one module that knows the CPU backend.

main.py and the benchmarks call `set_flags(config)` before JAX starts and `tune(config)` after. Nothing
here changes what a program computes (oneDNN's convolutions round differently from Eigen's, within float32
rounding), and nothing applies on GPUs or TPUs; deleting this module and those two calls leaves a correct
program that is slower and larger on CPUs. What it sets:
- XLA_FLAGS (read by XLA:CPU only): convolutions off YNNPACK for the jaxlibs that take the flag, and the
  op scheduler (config.cpu_scheduler);
- the number of JAX devices the host CPU is split into (config.num_cpu_devices);
- on the CPU backend: the library of the convolutions (config.cpu_convolutions; by default oneDNN for those
  it runs faster than Eigen where the CPU has AVX-512: a lowering rule for the CPU platform only,
  `set_convolutions`); micro-batches of CPU_MICRO_BATCH per device when training.grad_accum_steps is 0
  (automatic); the samplers compiled without YNNPACK fusions (runtime.INFERENCE_COMPILER_OPTIONS); the C
  heap's free pages handed back to the OS after each large compilation.
What each buys, measured: docs/performance.md.
"""
import ctypes
import functools
import json
import math
import os
import platform
import re

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np

from diffusion_jax import perf
from diffusion_jax import runtime
from diffusion_jax.checks import ConfigError

# XLA:CPU hands convolutions to YNNPACK by default (jaxlib 0.10-0.11), whose kernel gradient is several times
# slower than Eigen's; the train step is 1.3x faster (AVX2) to 1.4x (AVX-512) with Eigen's. Later jaxlibs may
# drop this experimental flag, and XLA aborts on unknown flags.
YNN_FUSION_OPTION = 'xla_cpu_experimental_ynn_fusion_type'
YNN_FLAG = f'--{YNN_FUSION_OPTION}=-individual_convolution'
YNN_FLAG_JAXLIB_VERSIONS = ((0, 10), (0, 12))  # [first, last) jaxlib versions that take YNN_FLAG.

# XLA:CPU's op schedulers (--xla_cpu_scheduler_type). 'memory_optimized' orders a train step for a 10-26% lower
# peak than XLA's default at about the same speed.
SCHEDULERS = ('default', 'memory_optimized', 'concurrency_optimized')

# num_cpu_devices = -1 keeps at least this many training examples per device: on 2 cores the demo's step at
# batch 16 runs 1.2-1.5x faster as 2 devices of 8 than as one threaded device, at batch 8 as 2 devices of 4 slower.
MIN_EXAMPLES_PER_DEVICE = 8

# Examples per device in a micro-batch when training.grad_accum_steps is 0: XLA:CPU trains fastest on small
# batches (the CIFAR-10 step at batch 128 as 8 micro-batches of 16 takes 0.6x the time of the whole batch).
CPU_MICRO_BATCH = 16

# A program without gradients (a sampler) runs faster with no YNNPACK fusions at all (the CIFAR-10 forward at
# batch 128: 6.6 s against 8.3 with YNN_FLAG on an AVX-512 Xeon); a train step keeps YNNPACK's reductions
# (4.7 s against 3.0 at batch 16 without them).

# Compilations at least this long are followed by a malloc_trim (it takes milliseconds).
TRIM_AFTER_COMPILE_SECONDS = 1.0
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


# Convolutions compiled for the CPU (config.cpu_convolutions). 'onednn': those with a kernel no larger than their
# output, no input dilation and one group (the model's and their input gradients), float32, on one device or per
# device under shard_map, run as XLA:CPU's own oneDNN custom call; all others, and every convolution with
# 'eigen', keep JAX's lowering (Eigen's kernels). 'auto': 'onednn' on CPUs with AVX-512, where oneDNN's forward
# and input gradient take 0.5-0.9x Eigen's time and a train step 0.91-0.94x (the AMD EPYC of
# docs/performance.md), 'eigen' elsewhere (limited to AVX2, the step was within the noise of Eigen's: not worth
# the cache it costs, below). XLA:CPU runs the call (jaxlib 0.10, x86-64) but no flag of it emits one, and its
# configuration is XLA's internal format: it is only emitted for the jaxlibs and machines it was checked on
# (tests/test_xla_cpu.py), and `tune` checks it against a reference before the first step. XLA cannot serialize
# a program with the call (JAX's attempt to cache one fails, or crashes the process), so oneDNN turns JAX's
# persistent compilation cache off: every program compiles anew in each process.
CONVOLUTIONS = ('auto', 'onednn', 'eigen')
ONEDNN_CONVOLUTION = '__onednn$convolution'
ONEDNN_CALL = f'custom_call_target="{ONEDNN_CONVOLUTION}"'  # How HLO text names the call.
ONEDNN_JAXLIB_VERSIONS = ((0, 10), (0, 11))  # [first, last) jaxlib versions whose XLA:CPU runs ONEDNN_CONVOLUTION.
ONEDNN_MACHINES = ('x86_64', 'amd64')  # platform.machine(), lower case: XLA builds oneDNN for x86-64 only.
_onednn_convolutions = False  # Read by the lowering rule when a program for the CPU is lowered.
_cache_turned_off = False  # Whether 'onednn' turned the persistent compilation cache off (back on with 'eigen').


def jaxlib_in(versions: tuple[tuple[int, int], tuple[int, int]]) -> bool:
  """Whether the installed jaxlib's (major, minor) is in [first, last) of `versions`."""
  import jaxlib.version  # pylint: disable=g-import-not-at-top
  first, last = versions
  return first <= tuple(int(part) for part in jaxlib.version.__version__.split('.')[:2]) < last


def xla_flags(scheduler: str) -> list[str]:
  """The flags this module adds to XLA_FLAGS for `scheduler`, leaving out options the user set there."""
  if scheduler not in SCHEDULERS:
    raise ConfigError(f'Unknown cpu_scheduler {scheduler!r}; choose one of {", ".join(SCHEDULERS)}.')
  ours = [YNN_FLAG] if jaxlib_in(YNN_FLAG_JAXLIB_VERSIONS) else []
  if scheduler != 'default':
    ours.append(f'--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_{scheduler.upper()}')
  user = {flag.split('=')[0].lstrip('-') for flag in os.environ.get('XLA_FLAGS', '').split()}
  return [flag for flag in ours if flag.split('=')[0].lstrip('-') not in user]


def set_flags(config) -> None:
  """XLA:CPU's flags (config.cpu_scheduler) and device count (config.num_cpu_devices); call before JAX starts.

  num_cpu_devices = -1 picks the largest count <= the number of cores that divides the training and
  sampling batch sizes and leaves MIN_EXAMPLES_PER_DEVICE training examples per device (at least 1 device).
  XLA_FLAGS set by the user take precedence, --xla_force_host_platform_device_count included.
  """
  ours = xla_flags(config.cpu_scheduler)
  _check_convolutions(config.cpu_convolutions)  # Applied by tune, on the CPU backend only.
  os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *ours]).strip()
  if 'xla_force_host_platform_device_count' in os.environ['XLA_FLAGS']:
    return
  count = config.num_cpu_devices
  if count == -1:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    divisor = math.gcd(config.training.batch_size, config.sampling.batch_size)
    count = max(n for n in range(1, cores + 1)
                if n == 1 or (divisor % n == 0 and config.training.batch_size // n >= MIN_EXAMPLES_PER_DEVICE))
  if not isinstance(count, int) or count < 1:
    raise ConfigError(f'num_cpu_devices must be >= 1 or -1 (one per core), got {count!r}.')
  jax.config.update('jax_num_cpu_devices', count)


def set_convolutions(library: str) -> bool:
  """Lowers the convolutions compiled for the CPU from now on with `library` (CONVOLUTIONS; 'auto': oneDNN where
  the CPU has AVX-512); returns whether that is oneDNN, which it only is with the jaxlibs and machines it was
  checked on (Eigen elsewhere). A change clears JAX's caches, so that jitted functions compile again with it;
  oneDNN turns the persistent compilation cache off."""
  global _onednn_convolutions, _cache_turned_off
  _check_convolutions(library)
  known = jaxlib_in(ONEDNN_JAXLIB_VERSIONS) and platform.machine().lower() in ONEDNN_MACHINES
  onednn = known and (library == 'onednn' or library == 'auto' and cpu_has_avx512())
  if onednn != _onednn_convolutions:
    jax.clear_caches()
  _onednn_convolutions = onednn
  if onednn:
    _register_convolution_lowering()
    _cache_turned_off = _cache_turned_off or jax.config.jax_enable_compilation_cache
    jax.config.update('jax_enable_compilation_cache', False)
    compilation_cache.reset_cache()  # JAX decides once whether to use the cache; this makes it decide again.
    logging.info('XLA:CPU: convolutions on oneDNN (cpu_convolutions=%s); no persistent compilation cache (XLA cannot '
                 'store them).', library)
  else:
    if _cache_turned_off:
      jax.config.update('jax_enable_compilation_cache', True)
      compilation_cache.reset_cache()
      _cache_turned_off = False
    if library != 'eigen':
      logging.info('XLA:CPU: convolutions on Eigen (cpu_convolutions=%s: oneDNN only with jaxlib 0.10 on x86-64%s).',
                   library, ', and for auto with AVX-512' if library == 'auto' else '')
  return onednn


def _check_convolutions(library: str) -> None:
  if library not in CONVOLUTIONS:
    raise ConfigError(f'Unknown cpu_convolutions {library!r}; choose one of {", ".join(CONVOLUTIONS)}.')


def cpu_has_avx512() -> bool:
  """Whether the host CPU has AVX-512 (avx512f among /proc/cpuinfo's flags; False where there is none)."""
  try:
    with open('/proc/cpuinfo') as f:
      return any(line.startswith('flags') and 'avx512f' in line.split() for line in f)
  except OSError:
    return False


def convolutions() -> str:
  """The library of the convolutions compiled for the CPU from now on: 'onednn' or 'eigen'."""
  return 'onednn' if _onednn_convolutions else 'eigen'


@functools.cache  # Registered once per process; set_convolutions switches it on and off.
def _register_convolution_lowering() -> None:
  from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
  from jax._src.lax import convolution  # pylint: disable=g-import-not-at-top
  lowerings = mlir._platform_specific_lowerings['cpu']  # pylint: disable=protected-access
  jax_rule = lowerings[convolution.conv_general_dilated_p].rule

  def rule(ctx, lhs, rhs, **params):
    if _onednn_convolutions and _onednn_runs(ctx, **params):
      _count_onednn_flops()
      return _onednn_convolution(ctx, lhs, rhs, **params)
    return jax_rule(ctx, lhs, rhs, **params)

  mlir.register_lowering(convolution.conv_general_dilated_p, rule, platform='cpu')


@functools.cache  # Once, when the first call is emitted.
def _count_onednn_flops() -> None:
  perf.UNCOUNTED_FLOPS.append(onednn_convolution_flops)


def _onednn_runs(ctx, *, lhs_dilation, dimension_numbers, feature_group_count, batch_group_count, padding,
                 **unused) -> bool:
  """Whether oneDNN takes this convolution: see CONVOLUTIONS."""
  from jax._src import sharding_impls  # pylint: disable=g-import-not-at-top
  (lhs, rhs), (out,) = ctx.avals_in, ctx.avals_out
  axes = ctx.module_context.axis_context  # A custom call cannot be split over devices by XLA's partitioner.
  on_one_device = (isinstance(axes, sharding_impls.ShardingContext) and axes.num_devices == 1
                   or isinstance(axes, sharding_impls.SPMDAxisContext)
                   and axes.manual_axes == frozenset(axes.mesh.axis_names))
  window = [rhs.shape[d] for d in dimension_numbers.rhs_spec[2:]]
  output = [out.shape[d] for d in dimension_numbers.out_spec[2:]]
  return (on_one_device and len(window) == 2 and lhs.dtype == rhs.dtype == out.dtype == jax.numpy.float32
          and feature_group_count == batch_group_count == 1 and all(d == 1 for d in lhs_dilation)
          and all(low >= 0 and high >= 0 for low, high in padding) and all(w <= o for w, o in zip(window, output)))


def _onednn_convolution(ctx, lhs, rhs, *, window_strides, padding, rhs_dilation, dimension_numbers, **unused):
  """The custom call XLA:CPU runs with oneDNN's convolution (xla/service/cpu/onednn_convolution.cc)."""
  from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  numbers = lambda values: [str(int(value)) for value in values]  # proto3 JSON spells 64-bit integers as strings.
  data = lambda spec: {'dims': str(len(spec)), 'data': {'batchDim': str(spec[0]), 'featureDim': str(spec[1]),
                                                        'spatialDims': numbers(spec[2:])}}
  config = {
      'dims': str(len(lhs_spec)), 'featureGroups': '1', 'input': data(lhs_spec), 'output': data(out_spec),
      'kernel': {'dims': str(len(rhs_spec)), 'filter': {'outputFeatureDim': str(rhs_spec[0]),
                                                        'inputFeatureDim': str(rhs_spec[1]),
                                                        'spatialDims': numbers(rhs_spec[2:])}},
      'window': {'size': numbers(ctx.avals_in[1].shape[d] for d in rhs_spec[2:]),
                 'padLeft': numbers(low for low, _ in padding), 'padRight': numbers(high for _, high in padding),
                 'strides': numbers(window_strides), 'windowDilations': numbers(rhs_dilation)}}
  row_major = lambda aval: list(reversed(range(aval.ndim)))
  result_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
  call = mlir.custom_call(ONEDNN_CONVOLUTION, result_types=[result_type], operands=[lhs, rhs],
                          backend_config=json.dumps({'onednnConvConfig': config}), api_version=1,
                          operand_layouts=[row_major(aval) for aval in ctx.avals_in],
                          result_layouts=[row_major(ctx.avals_out[0])])
  return call.results


# A oneDNN convolution in HLO text: its result and input shapes and its configuration (_onednn_convolution's).
_ONEDNN_LINE = re.compile(r'= f32\[([\d,]+)\]\S* custom-call\(.*' + re.escape(ONEDNN_CALL) + ', '
                          r'operand_layout_constraints=\{f32\[([\d,]+)\]\S*, f32\[[\d,]+\]\S*\}.*'
                          r'backend_config=(\{.*\})$', re.MULTILINE)


def onednn_convolution_flops(hlo_text: str) -> float:
  """FLOPs of the oneDNN convolutions in `hlo_text`, counted as XLA counts a convolution (2 per multiply-add of
  an input element, padding left out), plus the 1 that XLA's cost analysis takes off for each such call.

  Each call is counted once as written: in conditionals (XLA counts the costlier branch) or in functions called
  from several places the count differs from XLA's for the same program on Eigen.
  """
  calls = _ONEDNN_LINE.findall(hlo_text)
  if len(calls) != hlo_text.count(ONEDNN_CALL):
    raise ValueError(f'A {ONEDNN_CONVOLUTION} call in this HLO is not in the form xla_cpu._ONEDNN_LINE reads.')
  total = 0.0
  for out, lhs, config in calls:
    out, lhs = ([int(n) for n in shape.split(',')] for shape in (out, lhs))
    config = json.loads(config)['onednnConvConfig']
    window, spatial = config['window'], [int(d) for d in config['input']['data']['spatialDims']]
    taps = 1  # (output position, kernel position) pairs that read an input element, over all spatial dimensions.
    for i, size in enumerate(int(n) for n in window['size']):
      stride, dilation, low = (int(window[key][i]) for key in ('strides', 'windowDilations', 'padLeft'))
      out_size, in_size = out[int(config['output']['data']['spatialDims'][i])], lhs[spatial[i]]
      taps *= sum(0 <= o * stride + k * dilation - low < in_size for o in range(out_size) for k in range(size))
    batch, features = out[int(config['output']['data']['batchDim'])], out[int(config['output']['data']['featureDim'])]
    total += 2.0 * batch * features * lhs[int(config['input']['data']['featureDim'])] * taps + 1.0
  return total


def _onednn_agrees_with_a_reference() -> bool:
  """Whether a convolution lowered to oneDNN (strided, dilated, asymmetric padding, NCHW) runs and equals a
  sum of NumPy dots over slices of its input."""
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(2, 3, 9, 8)).astype(np.float32), rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
  strides, padding, dilation = (2, 1), ((0, 1), (2, 1)), (1, 2)
  numbers = ('NCHW', 'OIHW', 'NCHW')
  program = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                                              dimension_numbers=numbers)).lower(x, w).compile()
  if ONEDNN_CALL not in program.as_text():
    return False
  got = np.asarray(program(x, w))
  x = np.pad(x, ((0, 0), (0, 0), *padding))
  expected = sum(np.einsum('nchw,oc->nohw', x[:, :, i * dilation[0]::strides[0], j * dilation[1]::strides[1]]
                           [:, :, :got.shape[2], :got.shape[3]], w[:, :, i, j]) for i in range(3) for j in range(3))
  return got.shape == expected.shape and np.allclose(got, expected, rtol=1e-4, atol=1e-4)


def micro_batches(batch_size: int, num_devices: int) -> int:
  """Micro-batches of CPU_MICRO_BATCH per device when the per-device batch is a multiple of it above twice it."""
  per_device = batch_size // num_devices
  if per_device > 2 * CPU_MICRO_BATCH and not per_device % CPU_MICRO_BATCH:
    return per_device // CPU_MICRO_BATCH
  return 1


def tune(config) -> None:
  """On the CPU backend: the library of the convolutions (config.cpu_convolutions; oneDNN checked against a
  reference first, Eigen where it differs or fails), training.grad_accum_steps = 0 resolved to `micro_batches`,
  the samplers compiled without YNNPACK fusions, the C heap trimmed after each large compilation. Does nothing
  on GPUs and TPUs. Call after jax.distributed is initialized, before anything is compiled."""
  if jax.default_backend() != 'cpu':
    return
  if set_convolutions(config.cpu_convolutions) and not _onednn_agrees_with_a_reference():
    logging.warning('XLA:CPU: a oneDNN convolution did not give the reference values; convolutions on Eigen.')
    set_convolutions('eigen')
  user = {flag.split('=')[0].lstrip('-') for flag in os.environ.get('XLA_FLAGS', '').split() if flag != YNN_FLAG}
  if jaxlib_in(YNN_FLAG_JAXLIB_VERSIONS) and YNN_FUSION_OPTION not in user:
    runtime.INFERENCE_COMPILER_OPTIONS[YNN_FUSION_OPTION] = ''
  if config.training.grad_accum_steps == 0:
    config.training.grad_accum_steps = micro_batches(config.training.batch_size, jax.device_count())
    logging.info('XLA:CPU: training.grad_accum_steps=0 -> %d micro-batch(es).', config.training.grad_accum_steps)
  _trim_after_large_compilations()


@functools.cache  # Registered once per process.
def _trim_after_large_compilations() -> None:
  jax.monitoring.register_event_duration_secs_listener(_trim_after_compile)


def _trim_after_compile(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event == BACKEND_COMPILE_EVENT and duration >= TRIM_AFTER_COMPILE_SECONDS:
    release_freed_memory()


def release_freed_memory() -> None:
  """Hands the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere it does nothing).

  Compiling a train step leaves 0.3-0.5 GiB freed inside glibc's heap, which glibc keeps in the process:
  XLA maps each call's temporary buffer anew, so none of it is reused and the process stays that large.
  """
  try:
    malloc_trim = ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):  # Not glibc.
    return
  malloc_trim(0)
