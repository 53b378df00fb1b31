"""XLA:CPU tuning: the one module that knows the CPU backend.

main.py and the benchmarks call `set_flags(config)` before JAX starts and `tune(config)` after. Nothing
here changes what a program computes, and nothing applies on GPUs or TPUs; deleting this module and those
two calls leaves a correct program that is slower and larger on CPUs. What it sets:
- XLA_FLAGS (read by XLA:CPU only): convolutions off YNNPACK for the jaxlibs that take the flag, and the
  op scheduler (config.cpu_scheduler);
- the number of JAX devices the host CPU is split into (config.num_cpu_devices);
- on the CPU backend: micro-batches of CPU_MICRO_BATCH per device when training.grad_accum_steps is 0
  (automatic); the samplers compiled without YNNPACK fusions (runtime.INFERENCE_COMPILER_OPTIONS); the C
  heap's free pages handed back to the OS after each large compilation.
What each buys, measured: docs/performance.md.
"""
import ctypes
import functools
import math
import os

from absl import logging
import jax

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


def _jaxlib_takes_ynn_flag() -> bool:
  import jaxlib.version  # pylint: disable=g-import-not-at-top
  first, last = YNN_FLAG_JAXLIB_VERSIONS
  return first <= tuple(int(part) for part in jaxlib.version.__version__.split('.')[:2]) < last


def xla_flags(scheduler: str) -> list[str]:
  """The flags this module adds to XLA_FLAGS for `scheduler`, leaving out options the user set there."""
  if scheduler not in SCHEDULERS:
    raise ConfigError(f'Unknown cpu_scheduler {scheduler!r}; choose one of {", ".join(SCHEDULERS)}.')
  ours = [YNN_FLAG] if _jaxlib_takes_ynn_flag() else []
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


def micro_batches(batch_size: int, num_devices: int) -> int:
  """Micro-batches of CPU_MICRO_BATCH per device when the per-device batch is a multiple of it above twice it."""
  per_device = batch_size // num_devices
  if per_device > 2 * CPU_MICRO_BATCH and not per_device % CPU_MICRO_BATCH:
    return per_device // CPU_MICRO_BATCH
  return 1


def tune(config) -> None:
  """On the CPU backend: resolves training.grad_accum_steps = 0 to `micro_batches`, compiles the samplers
  without YNNPACK fusions, and trims the C heap after each large compilation. Does nothing on GPUs and TPUs.
  Call after jax.distributed is initialized."""
  if jax.default_backend() != 'cpu':
    return
  user = {flag.split('=')[0].lstrip('-') for flag in os.environ.get('XLA_FLAGS', '').split() if flag != YNN_FLAG}
  if _jaxlib_takes_ynn_flag() and YNN_FUSION_OPTION not in user:
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
