"""Process set-up: CPU device layout, the compilation cache, jax.distributed.initialize for several processes,
and handing the compiler's freed memory back to the OS."""
import ctypes
import functools
import math
import os

from absl import logging
import jax
import jax.numpy as jnp
from jax.extend import random as jax_random
from jax.interpreters import mlir
import numpy as np

# Set by launchers (our launch/ scripts, or by hand) to run several processes on one or more machines.
COORDINATOR_ENV = 'DIFFUSION_JAX_COORDINATOR'  # host:port of process 0
NUM_PROCESSES_ENV = 'DIFFUSION_JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'DIFFUSION_JAX_PROCESS_ID'


def initialize() -> None:
  """Joins the processes of a multi-host run: explicit environment variables, or auto-detected clusters.

  TPU VM pods and SLURM are detected by JAX itself; a single plain process does nothing.
  """
  if os.environ.get(COORDINATOR_ENV):
    jax.distributed.initialize(coordinator_address=os.environ[COORDINATOR_ENV],
                               num_processes=int(os.environ[NUM_PROCESSES_ENV]),
                               process_id=int(os.environ[PROCESS_ID_ENV]))
  elif 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()
  elif os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:
    jax.distributed.initialize()
  else:
    return
  logging.info('Process %d of %d; %d local of %d devices.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


# XLA:CPU hands convolutions to YNNPACK by default (jaxlib 0.10-0.11), whose kernel gradient runs at a third
# of the forward's speed; Eigen's runs at full speed, and the CIFAR-10 train step is 1.3x faster with it
# (bench/README.md). Later jaxlibs may drop this experimental flag, and XLA aborts on unknown flags.
YNN_FUSION_OPTION = 'xla_cpu_experimental_ynn_fusion_type'  # Which ops XLA:CPU hands to YNNPACK.
CPU_XLA_FLAG = f'--{YNN_FUSION_OPTION}=-individual_convolution'
CPU_XLA_FLAG_JAXLIB_VERSIONS = ((0, 10), (0, 12))  # [first, last) jaxlib versions that take CPU_XLA_FLAG.


def _jaxlib_takes_cpu_xla_flag() -> bool:
  import jaxlib.version  # pylint: disable=g-import-not-at-top
  first, last = CPU_XLA_FLAG_JAXLIB_VERSIONS
  return first <= tuple(int(part) for part in jaxlib.version.__version__.split('.')[:2]) < last


def _xla_options(skip: tuple[str, ...] = ()) -> set[str]:
  """The options (names without dashes) that XLA_FLAGS sets, ignoring the flags in skip."""
  return {flag.split('=')[0].lstrip('-') for flag in os.environ.get('XLA_FLAGS', '').split() if flag not in skip}


def _cpu_compiler_option(option: str, value, skip: tuple[str, ...] = ()) -> dict:
  """{option: value} as jax.jit compiler_options on the CPU with the jaxlibs that take CPU_XLA_FLAG; {} on GPUs
  and TPUs, or when XLA_FLAGS (ignoring the flags in skip) set the option: the user's choice wins."""
  if not _jaxlib_takes_cpu_xla_flag() or jax.default_backend() != 'cpu' or option in _xla_options(skip):
    return {}
  return {option: value}


# A program without a backward pass (a sampler, a forward) runs faster on the CPU with no YNNPACK fusions at
# all: XLA:CPU's own dots and reductions make the U-Net's forward 6-18% faster. A train step keeps them:
# without YNNPACK's reductions, the gradients of the biases and norms make it 40% slower.
def forward_compiler_options() -> dict[str, str]:
  """jax.jit compiler_options for programs without gradients: no YNNPACK fusions (where: _cpu_compiler_option)."""
  return _cpu_compiler_option(YNN_FUSION_OPTION, '', skip=(CPU_XLA_FLAG,))


# A program that runs once (the parameter initializer: hundreds of random draws) compiles in ~14% less time and
# 0.02-0.06 GiB less memory with XLA:CPU's older fusion emitters (measured with jaxlib 0.10; the option is assumed
# for the same versions as CPU_XLA_FLAG); the same bits (a test checks), and it runs in milliseconds either way.
FUSION_EMITTERS_OPTION = 'xla_cpu_use_fusion_emitters'


def initializer_compiler_options() -> dict[str, bool]:
  """jax.jit compiler_options for a program run once: XLA's older fusion emitters (where: _cpu_compiler_option)."""
  return _cpu_compiler_option(FUSION_EMITTERS_OPTION, False)


# XLA:CPU's op schedulers (--xla_cpu_scheduler_type). XLA's default favours running independent ops at once;
# 'memory_optimized' orders a train step for a 10-26% lower peak at about the same speed (README "Benchmarks").
CPU_SCHEDULERS = ('default', 'memory_optimized', 'concurrency_optimized')


def set_cpu_xla_flags(scheduler: str) -> None:
  """Adds the project's XLA:CPU flags to XLA_FLAGS; options the user already set there are left alone.

  CPU_XLA_FLAG goes in for the jaxlib versions that know it; scheduler (one of CPU_SCHEDULERS) picks
  XLA:CPU's op scheduler. Also lowers large Threefry hashes unrolled on the CPU (unroll_threefry_on_cpu).
  Call before JAX starts a backend.
  """
  if scheduler not in CPU_SCHEDULERS:
    raise ValueError(f'Unknown cpu_scheduler {scheduler!r}; choose one of {", ".join(CPU_SCHEDULERS)}.')
  unroll_threefry_on_cpu()
  ours = [CPU_XLA_FLAG] if _jaxlib_takes_cpu_xla_flag() else []
  if scheduler != 'default':
    ours.append(f'--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_{scheduler.upper()}')
  already_set = _xla_options()
  ours = [flag for flag in ours if flag.split('=')[0].lstrip('-') not in already_set]
  os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *ours]).strip()


THREEFRY_ROTATIONS = np.array([[13, 15, 26, 6], [17, 29, 16, 24]], np.uint32)  # Even and odd blocks' rounds.

# Threefry on the CPU: hashes whose outputs have at least this many elements (random arrays: dropout masks,
# noise) are lowered unrolled; smaller ones (at this project's batch sizes, the keys from split and fold_in and
# the per-example keys) keep a loop. Unrolled, XLA copied those into every fusion that uses their keys: 15% of
# the train step's program, 20% of its compile time.
UNROLL_THREEFRY_FROM_SIZE = 1024


def _threefry_block(state: tuple, rotations, block_number) -> tuple:
  """4 rounds, then the key schedule's injection; state (x1, x2, key1, key2, key3) -> state with keys rotated."""
  x1, x2, key1, key2, key3 = state
  for i in range(4):
    x1 = x1 + x2
    x2 = x1 ^ (jax.lax.shift_left(x2, rotations[i]) | jax.lax.shift_right_logical(x2, np.uint32(32) - rotations[i]))
  return x1 + key2, x2 + key3 + block_number, key2, key3, key1


def _threefry2x32(key1, key2, x1, x2, unrolled: bool):
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011) as JAX computes it: 5 blocks of 4 rounds.

  key1, key2, x1, x2: uint32 arrays (the key words broadcast against the counts); returns the two
  uint32 output words. unrolled: straight-line code (XLA fuses the 20 rounds into one pass), else a
  loop over the blocks (as JAX's own CPU lowering).
  """
  key1, key2 = jnp.broadcast_arrays(key1, key2)  # The keys take turns in the state: the loop needs one shape.
  state = (x1 + key1, x2 + key2, key1, key2, key1 ^ key2 ^ np.uint32(0x1BD11BDA))
  if unrolled:
    for b in range(5):
      state = _threefry_block(state, THREEFRY_ROTATIONS[b % 2], np.uint32(b + 1))
  else:  # Each block's rotations are row 0 of the carried table, whose rows swap after every block.
    state, _ = jax.lax.fori_loop(0, 5, lambda b, carry: (
        _threefry_block(carry[0], carry[1][0], (b + 1).astype(jnp.uint32)), carry[1][::-1]),
        (state, jnp.asarray(THREEFRY_ROTATIONS)))
  return list(state[:2])


def _threefry2x32_cpu_lowering(ctx, *args):
  """The threefry2x32 primitive's CPU lowering: unrolled for outputs of UNROLL_THREEFRY_FROM_SIZE elements or
  more (known at compile time; a symbolic shape keeps the loop)."""
  shape = ctx.avals_out[0].shape
  unrolled = all(isinstance(d, int) for d in shape) and math.prod(shape) >= UNROLL_THREEFRY_FROM_SIZE
  return mlir.lower_fun(functools.partial(_threefry2x32, unrolled=unrolled), multiple_results=True)(ctx, *args)


def unroll_threefry_on_cpu() -> None:
  """Lowers JAX's Threefry hashes with outputs of >= UNROLL_THREEFRY_FROM_SIZE elements straight-line on the CPU.

  JAX lowers Threefry on CPUs as a loop of 5 blocks, which XLA:CPU runs as 5 passes over memory; the same
  bits unrolled (a test checks the published test vectors) fuse into one pass: 4-6x faster random arrays,
  and dropout's share of a CIFAR-10 train step drops from ~4% to ~1%. Smaller hashes keep the loop.
  """
  mlir.register_lowering(jax_random.threefry2x32_p, _threefry2x32_cpu_lowering, platform='cpu')


def configure_cpu_devices(num_cpu_devices: int, batch_sizes: tuple[int, ...], scheduler: str) -> None:
  """Sets the XLA:CPU flags and splits the host CPU into several JAX devices; call before jax starts.

  The devices matter only when there is no GPU/TPU: several simulate data parallelism, or split a
  many-core host. -1 picks the largest count <= the number of cores that divides every batch size;
  XLA_FLAGS set by the user take precedence. scheduler: XLA:CPU's op scheduler (CPU_SCHEDULERS).
  """
  set_cpu_xla_flags(scheduler)
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return
  if num_cpu_devices == -1:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    divisor = math.gcd(*batch_sizes)
    num_cpu_devices = max(n for n in range(1, cores + 1) if divisor % n == 0)
  if num_cpu_devices < 1:
    raise ValueError(f'num_cpu_devices must be >= 1 or -1 (one per core), got {num_cpu_devices}.')
  jax.config.update('jax_num_cpu_devices', num_cpu_devices)


def enable_compilation_cache(cache_dir: str | None) -> None:
  """Keeps compiled programs in cache_dir (a local path or gs://), so that a restart does not recompile.

  JAX_COMPILATION_CACHE_DIR, when set, takes precedence; None or '' disables the cache.
  """
  if cache_dir and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def release_freed_memory() -> None:
  """Hands the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere it does nothing).

  Compiling a train step leaves 0.3-0.5 GiB freed inside glibc's heap (MNIST-scale and CIFAR-10
  models), which glibc keeps in the process: XLA maps each call's temporary buffer anew, so none of
  it is reused and the process stays that much larger. Call it after a compilation.
  """
  try:
    malloc_trim = ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):  # Not glibc.
    return
  malloc_trim(0)
