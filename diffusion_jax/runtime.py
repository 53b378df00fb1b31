"""The process around a run: joining the processes of a multi-host run, the compilation cache, the device mesh."""
import os

from absl import logging
import jax
from jax.sharding import Mesh
import numpy as np

# Compiler options for programs without gradients (the samplers), which a backend's tuning module may set
# (xla_cpu.py: no YNNPACK fusions on the CPU); empty, the backend's defaults, unless one does.
INFERENCE_COMPILER_OPTIONS: dict = {}

# Set by launchers (our launch/ scripts, or by hand) to run several processes on one or more machines.
COORDINATOR_ENV = 'DIFFUSION_JAX_COORDINATOR'  # host:port of process 0
NUM_PROCESSES_ENV = 'DIFFUSION_JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'DIFFUSION_JAX_PROCESS_ID'


def initialize() -> None:
  """Joins the processes of a multi-host run: explicit environment variables, or auto-detected clusters.

  TPU VM pods and SLURM are detected by JAX itself; a single plain process does nothing. Call before
  JAX starts a backend.
  """
  if os.environ.get(COORDINATOR_ENV):
    jax.distributed.initialize(coordinator_address=os.environ[COORDINATOR_ENV],
                               num_processes=int(os.environ[NUM_PROCESSES_ENV]),
                               process_id=int(os.environ[PROCESS_ID_ENV]))
  elif 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()
  elif os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:
    jax.distributed.initialize()


def log_devices() -> None:
  logging.info('Process %d of %d; %d local of %d %s devices.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())


def enable_compilation_cache(cache_dir: str | None) -> None:
  """Keeps compiled programs in cache_dir (a local path or gs://), so that a restart does not recompile.

  JAX_COMPILATION_CACHE_DIR, when set, takes precedence; None or '' disables the cache.
  """
  if cache_dir and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def inference_compiler_options() -> dict:
  """jax.jit compiler_options for the samplers: INFERENCE_COMPILER_OPTIONS, as a backend's tuning set them."""
  return dict(INFERENCE_COMPILER_OPTIONS)


def create_mesh() -> Mesh:
  """A 1-D mesh named `batch` over all devices of all hosts."""
  return Mesh(np.asarray(jax.devices()), ('batch',))
