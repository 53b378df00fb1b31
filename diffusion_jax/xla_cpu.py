"""XLA:CPU tuning: the one module that knows the CPU backend.

main.py and the benchmarks call `set_flags(config)` before JAX starts and `tune(config)` after. Nothing
here changes what a program computes (oneDNN's convolutions and dots round differently from XLA's, within
float32 rounding), and nothing applies on GPUs or TPUs; deleting this module and those two calls leaves a correct
program that is slower and larger on CPUs. What it sets:
- XLA_FLAGS (read by XLA:CPU only): convolutions off YNNPACK for the jaxlibs that take the flag, and the
  op scheduler (config.cpu_scheduler);
- the number of JAX devices the host CPU is split into (config.num_cpu_devices);
- on the CPU backend: the kernels of the convolutions and dots (config.cpu_kernels; by default oneDNN for those
  it runs faster where the CPU has AVX-512: lowering rules for the CPU platform only, `set_kernels`);
  micro-batches of CPU_MICRO_BATCH per device when training.grad_accum_steps is 0 (automatic); the samplers
  compiled without YNNPACK fusions (runtime.INFERENCE_COMPILER_OPTIONS); the C heap's free pages handed back to
  the OS after each large compilation.
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
import jax.numpy as jnp
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


# The kernels of the convolutions and matrix products compiled for the CPU (config.cpu_kernels). 'onednn': those that
# oneDNN takes (ONEDNN_CONVOLUTION: a kernel no larger than the output, no input dilation, one group: the model's
# convolutions and their input gradients; ONEDNN_MATMUL: dots whose batch dimensions lead both operands, above
# ONEDNN_MATMUL_MIN_FLOPS) run as XLA:CPU's own oneDNN custom calls, float32, on one device or per device under
# shard_map; all others keep JAX's lowering. 'xla': XLA's own kernels for all (Eigen's convolutions, YNNPACK's or
# Eigen's dots). 'auto': 'onednn' on CPUs with AVX-512, where oneDNN's forward convolution and input gradient take
# 0.5-0.9x Eigen's time, its matmul 0.64-1.06x XLA's dots, and a train step 0.91-0.93x with both (the AMD EPYC of
# docs/performance.md), 'xla' elsewhere (limited to AVX2, the step was within the noise of Eigen's: not worth the
# cache it costs, below).
# XLA:CPU runs the calls (jaxlib 0.10, x86-64) but no flag of it emits them, and their configuration is XLA's
# internal format: they are only emitted for the jaxlibs and machines they were checked on (tests/test_xla_cpu.py),
# and `tune` checks both against a reference before the first step. XLA cannot serialize a program with such a call
# (JAX's attempt to cache one fails, or crashes the process), so oneDNN turns JAX's persistent compilation cache
# off: every program compiles anew in each process.
CPU_KERNELS = ('auto', 'onednn', 'xla')
ONEDNN_CONVOLUTION = '__onednn$convolution'
ONEDNN_MATMUL = '__onednn$matmul'
ONEDNN_CALLS = (ONEDNN_CONVOLUTION, ONEDNN_MATMUL)
ONEDNN_JAXLIB_VERSIONS = ((0, 10), (0, 11))  # [first, last) jaxlib versions whose XLA:CPU runs ONEDNN_CALLS.
ONEDNN_MACHINES = ('x86_64', 'amd64')  # platform.machine(), lower case: XLA builds oneDNN for x86-64 only.
# FLOPs below which a dot keeps XLA's kernel (oneDNN's call has a fixed cost), as XLA's own oneDNN rewriter:
# (unbatched, batched).
ONEDNN_MATMUL_MIN_FLOPS = (2**24, 2**19)
_onednn = False  # Read by the lowering rules when a program for the CPU is lowered.
_cache_turned_off = False  # Whether 'onednn' turned the persistent compilation cache off (back on with 'xla').


def onednn_call(target: str) -> str:
  """How HLO text names a custom call to `target` (one of ONEDNN_CALLS)."""
  return f'custom_call_target="{target}"'


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
  _check_kernels(config.cpu_kernels)  # Applied by tune, on the CPU backend only.
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


def set_kernels(library: str) -> bool:
  """Lowers the convolutions and dots compiled for the CPU from now on with `library` (CPU_KERNELS; 'auto': oneDNN
  where the CPU has AVX-512); returns whether that is oneDNN, which it only is with the jaxlibs and machines it was
  checked on (XLA's kernels elsewhere). A change clears JAX's caches, so that jitted functions compile again with
  it; oneDNN turns the persistent compilation cache off."""
  global _onednn, _cache_turned_off
  _check_kernels(library)
  known = jaxlib_in(ONEDNN_JAXLIB_VERSIONS) and platform.machine().lower() in ONEDNN_MACHINES
  onednn = known and (library == 'onednn' or library == 'auto' and cpu_has_avx512())
  if onednn != _onednn:
    jax.clear_caches()
  _onednn = onednn
  if onednn:
    _register_onednn_lowerings()
    _cache_turned_off = _cache_turned_off or jax.config.jax_enable_compilation_cache
    jax.config.update('jax_enable_compilation_cache', False)
    compilation_cache.reset_cache()  # JAX decides once whether to use the cache; this makes it decide again.
    logging.info('XLA:CPU: convolutions and matrix products on oneDNN (cpu_kernels=%s); no persistent compilation '
                 'cache (XLA cannot store them).', library)
  else:
    if _cache_turned_off:
      jax.config.update('jax_enable_compilation_cache', True)
      compilation_cache.reset_cache()
      _cache_turned_off = False
    if library != 'xla':
      logging.info("XLA:CPU: XLA's own kernels (cpu_kernels=%s: oneDNN only with jaxlib 0.10 on x86-64%s).",
                   library, ', and for auto with AVX-512' if library == 'auto' else '')
  return onednn


def _check_kernels(library: str) -> None:
  if library not in CPU_KERNELS:
    raise ConfigError(f'Unknown cpu_kernels {library!r}; choose one of {", ".join(CPU_KERNELS)}.')


def cpu_has_avx512() -> bool:
  """Whether the host CPU has AVX-512 (avx512f among /proc/cpuinfo's flags; False where there is none)."""
  try:
    with open('/proc/cpuinfo') as f:
      return any(line.startswith('flags') and 'avx512f' in line.split() for line in f)
  except OSError:
    return False


def kernels() -> str:
  """The kernels of the convolutions and dots compiled for the CPU from now on: 'onednn' or 'xla'."""
  return 'onednn' if _onednn else 'xla'


@functools.cache  # Registered once per process; set_kernels switches them on and off.
def _register_onednn_lowerings() -> None:
  from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
  from jax._src.lax import convolution  # pylint: disable=g-import-not-at-top
  from jax._src.lax import lax  # pylint: disable=g-import-not-at-top
  cpu_rules = mlir._platform_specific_lowerings['cpu']  # pylint: disable=protected-access

  def register(primitive, onednn_form, emit):
    jax_rule = (cpu_rules.get(primitive) or mlir._lowerings[primitive]).rule  # pylint: disable=protected-access

    def rule(ctx, lhs, rhs, **params):
      form = _onednn and _on_one_device(ctx) and onednn_form(ctx, **params)
      if form:
        _count_onednn_flops()
        return emit(ctx, lhs, rhs, form, **params)
      return jax_rule(ctx, lhs, rhs, **params)

    mlir.register_lowering(primitive, rule, platform='cpu')

  register(convolution.conv_general_dilated_p, _onednn_takes_convolution, _onednn_convolution)
  register(lax.dot_general_p, _onednn_matmul_form, _onednn_matmul)


@functools.cache  # Once, when the first call is emitted.
def _count_onednn_flops() -> None:
  perf.UNCOUNTED_FLOPS.append(onednn_flops)


def _on_one_device(ctx) -> bool:
  """Whether the program being lowered runs on one device or per device (shard_map over all mesh axes): XLA's
  partitioner cannot split a custom call."""
  from jax._src import sharding_impls  # pylint: disable=g-import-not-at-top
  axes = ctx.module_context.axis_context
  return (isinstance(axes, sharding_impls.ShardingContext) and axes.num_devices == 1
          or isinstance(axes, sharding_impls.SPMDAxisContext) and axes.manual_axes == frozenset(axes.mesh.axis_names))


def _row_major(ndim: int) -> list[int]:
  return list(reversed(range(ndim)))


def _onednn_takes_convolution(ctx, *, lhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
                              padding, **unused) -> bool:
  """Whether oneDNN takes this convolution: see CPU_KERNELS."""
  (lhs, rhs), (out,) = ctx.avals_in, ctx.avals_out
  window = [rhs.shape[d] for d in dimension_numbers.rhs_spec[2:]]
  output = [out.shape[d] for d in dimension_numbers.out_spec[2:]]
  return (len(window) == 2 and lhs.dtype == rhs.dtype == out.dtype == jnp.float32
          and feature_group_count == batch_group_count == 1 and all(d == 1 for d in lhs_dilation)
          and all(low >= 0 and high >= 0 for low, high in padding) and all(w <= o for w, o in zip(window, output)))


def _onednn_convolution(ctx, lhs, rhs, unused_form, *, window_strides, padding, rhs_dilation, dimension_numbers,
                        **unused):
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
  result_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
  call = mlir.custom_call(ONEDNN_CONVOLUTION, result_types=[result_type], operands=[lhs, rhs],
                          backend_config=json.dumps({'onednnConvConfig': config}), api_version=1,
                          operand_layouts=[_row_major(aval.ndim) for aval in ctx.avals_in],
                          result_layouts=[_row_major(ctx.avals_out[0].ndim)])
  return call.results


def _matrix(shape, batch, contracting) -> tuple[int, int, bool] | None:
  """An operand of a dot as (free size, contracting size, whether its contracting dimensions come first) where its
  batch dimensions lead, then its free and contracting dimensions each form one block; None otherwise."""
  nb, rank = len(batch), len(shape)
  contracting = sorted(contracting)
  free = [d for d in range(nb, rank) if d not in contracting]
  if list(batch) != list(range(nb)) or not free or not contracting:
    return None
  size = lambda dims: math.prod(shape[d] for d in dims)
  if contracting == list(range(nb, nb + len(contracting))):
    return size(free), size(contracting), True
  if contracting == list(range(rank - len(contracting), rank)):
    return size(free), size(contracting), False
  return None


def _onednn_matmul_form(ctx, *, dimension_numbers, preferred_element_type, **unused):
  """(batch shape, (M, K), (K, N), transpose_a, transpose_b) of a dot oneDNN takes as a batched matrix product
  (see CPU_KERNELS), or None."""
  (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = dimension_numbers
  (lhs, rhs), (out,) = ctx.avals_in, ctx.avals_out
  if not (lhs.dtype == rhs.dtype == out.dtype == jnp.float32 and preferred_element_type in (None, jnp.float32)
          and tuple(lhs_batch) == tuple(rhs_batch)):
    return None
  pairs = sorted(zip(lhs_contracting, rhs_contracting))  # Both flatten their contracting dimensions in order.
  a, b = _matrix(lhs.shape, lhs_batch, lhs_contracting), _matrix(rhs.shape, rhs_batch, rhs_contracting)
  if a is None or b is None or [r for _, r in pairs] != sorted(rhs_contracting):
    return None
  (m, k, transpose_a), (n, _, k_first) = a, b
  batch = tuple(lhs.shape[d] for d in lhs_batch)
  if 2 * math.prod(batch) * m * n * k < ONEDNN_MATMUL_MIN_FLOPS[bool(batch)]:
    return None
  return batch, (m, k), (k, n), transpose_a, not k_first


def _onednn_matmul(ctx, lhs, rhs, form, **unused):
  """The custom call XLA:CPU runs with oneDNN's matmul (xla/service/cpu/onednn_matmul.cc) on the operands reshaped
  to batched matrices (M, K) or (K, M) and (K, N) or (N, K), its (batch, M, N) result reshaped to the dot's."""
  from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir.dialects import hlo  # pylint: disable=g-import-not-at-top
  batch, (m, k), (_, n), transpose_a, transpose_b = form
  f32 = lambda *shape: ir.RankedTensorType.get([*batch, *shape], ir.F32Type.get())
  lhs = hlo.reshape(f32(*((k, m) if transpose_a else (m, k))), lhs)
  rhs = hlo.reshape(f32(*((n, k) if transpose_b else (k, n))), rhs)
  config = {'onednnMatmulConfig': {'transposeA': transpose_a, 'transposeB': transpose_b}}
  rank = len(batch) + 2
  call = mlir.custom_call(ONEDNN_MATMUL, result_types=[f32(m, n)], operands=[lhs, rhs],
                          backend_config=json.dumps(config), api_version=1,
                          operand_layouts=[_row_major(rank)] * 2, result_layouts=[_row_major(rank)])
  return [hlo.reshape(mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0]), call.results[0])]


# A oneDNN call in HLO text: its result and operand shapes and its configuration (_onednn_convolution's or
# _onednn_matmul's).
_ONEDNN_LINE = re.compile(r'= f32\[([\d,]+)\]\S* custom-call\(.*custom_call_target="(__onednn\$\w+)", '
                          r'operand_layout_constraints=\{f32\[([\d,]+)\]\S*, f32\[([\d,]+)\]\S*\}.*'
                          r'backend_config=(\{.*\})$', re.MULTILINE)


def onednn_flops(hlo_text: str) -> float:
  """FLOPs of the oneDNN calls in `hlo_text`, counted as XLA counts a convolution or dot (2 per multiply-add; of a
  convolution, those of an input element, padding left out), plus the 1 that XLA's cost analysis takes off for
  each such call.

  Each call is counted once as written: in conditionals (XLA counts the costlier branch) or in functions called
  from several places the count differs from XLA's for the same program with XLA's kernels.
  """
  calls = _ONEDNN_LINE.findall(hlo_text)
  if len(calls) != sum(hlo_text.count(onednn_call(target)) for target in ONEDNN_CALLS):
    raise ValueError('A oneDNN call in this HLO is not in the form xla_cpu._ONEDNN_LINE reads.')
  total = 0.0
  for out, target, lhs, rhs, config in calls:
    out, lhs, rhs = ([int(n) for n in shape.split(',')] for shape in (out, lhs, rhs))
    if target == ONEDNN_MATMUL:
      transpose_a = json.loads(config)['onednnMatmulConfig'].get('transposeA', False)
      total += 2.0 * math.prod(out) * lhs[-2 if transpose_a else -1] + 1.0
    else:
      total += _convolution_flops(out, lhs, json.loads(config)['onednnConvConfig']) + 1.0
  return total


def _convolution_flops(out: list[int], lhs: list[int], config: dict) -> float:
  window, spatial = config['window'], [int(d) for d in config['input']['data']['spatialDims']]
  taps = 1  # (output position, kernel position) pairs that read an input element, over all spatial dimensions.
  for i, size in enumerate(int(n) for n in window['size']):
    stride, dilation, low = (int(window[key][i]) for key in ('strides', 'windowDilations', 'padLeft'))
    out_size, in_size = out[int(config['output']['data']['spatialDims'][i])], lhs[spatial[i]]
    taps *= sum(0 <= o * stride + k * dilation - low < in_size for o in range(out_size) for k in range(size))
  batch, features = out[int(config['output']['data']['batchDim'])], out[int(config['output']['data']['featureDim'])]
  return 2.0 * batch * features * lhs[int(config['input']['data']['featureDim'])] * taps


def _onednn_agrees_with_a_reference() -> bool:
  """Whether a convolution (strided, dilated, asymmetric padding, NCHW) and a batched dot with both operands
  transposed, lowered to oneDNN, run and equal NumPy's sums of products."""
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(2, 3, 9, 8)).astype(np.float32), rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
  strides, padding, dilation = (2, 1), ((0, 1), (2, 1)), (1, 2)
  numbers = ('NCHW', 'OIHW', 'NCHW')
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                                           dimension_numbers=numbers)).lower(x, w).compile()
  a, b = rng.normal(size=(2, 96, 64)).astype(np.float32), rng.normal(size=(2, 80, 96)).astype(np.float32)
  dot = jax.jit(lambda a, b: jnp.einsum('bkm,bnk->bmn', a, b)).lower(a, b).compile()
  if onednn_call(ONEDNN_CONVOLUTION) not in conv.as_text() or onednn_call(ONEDNN_MATMUL) not in dot.as_text():
    return False
  got = np.asarray(conv(x, w))
  x = np.pad(x, ((0, 0), (0, 0), *padding))
  expected = sum(np.einsum('nchw,oc->nohw', x[:, :, i * dilation[0]::strides[0], j * dilation[1]::strides[1]]
                           [:, :, :got.shape[2], :got.shape[3]], w[:, :, i, j]) for i in range(3) for j in range(3))
  product = np.asarray(dot(a, b))
  return (got.shape == expected.shape and np.allclose(got, expected, rtol=1e-4, atol=1e-4)
          and np.allclose(product, np.einsum('bkm,bnk->bmn', a, b), rtol=1e-4, atol=1e-3))


def micro_batches(batch_size: int, num_devices: int) -> int:
  """Micro-batches of CPU_MICRO_BATCH per device when the per-device batch is a multiple of it above twice it."""
  per_device = batch_size // num_devices
  if per_device > 2 * CPU_MICRO_BATCH and not per_device % CPU_MICRO_BATCH:
    return per_device // CPU_MICRO_BATCH
  return 1


def tune(config) -> None:
  """On the CPU backend: the kernels of the convolutions and dots (config.cpu_kernels; oneDNN checked against a
  reference first, XLA's where it differs or fails), training.grad_accum_steps = 0 resolved to `micro_batches`,
  the samplers compiled without YNNPACK fusions, the C heap trimmed after each large compilation. Does nothing
  on GPUs and TPUs. Call after jax.distributed is initialized, before anything is compiled."""
  if jax.default_backend() != 'cpu':
    return
  if set_kernels(config.cpu_kernels) and not _onednn_agrees_with_a_reference():
    logging.warning("XLA:CPU: oneDNN's convolution or matmul did not give the reference values; XLA's kernels.")
    set_kernels('xla')
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
