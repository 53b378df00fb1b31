"""Shared test set-up: quiet TensorFlow, a compilation cache shared by tests and their subprocesses, paths."""
import os
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests compile the same tiny model; subprocesses inherit the cache through the environment.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'diffusion_jax_test_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
# Tests run with the XLA:CPU flags that main.py sets (before JAX starts a backend), on one CPU device: tests of
# several devices or hosts start subprocesses with their own count.
from configs import default  # pylint: disable=wrong-import-position
from diffusion_jax import xla_cpu  # pylint: disable=wrong-import-position
_config = default.get_config()
_config.num_cpu_devices = 1
xla_cpu.set_flags(_config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
