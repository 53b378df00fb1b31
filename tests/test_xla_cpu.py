"""The XLA:CPU module: its flags, device count, micro-batches, convolutions and dots, and that the core runs
without it.

The tests that look at XLA's compiled programs (YNNPACK fusions, the scheduler's peak, oneDNN's custom calls)
know jaxlib 0.10-0.11 (oneDNN: 0.10) and skip with a reason on other versions.
"""
import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
import pytest

from conftest import REPO
from configs import default
from configs.tiny import get_config as tiny_config
from diffusion_jax import xla_cpu
from diffusion_jax.checks import ConfigError

MEMORY_SCHEDULER_FLAG = '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'
KNOWN_JAXLIB = xla_cpu.jaxlib_in(xla_cpu.YNN_FLAG_JAXLIB_VERSIONS)
needs_known_jaxlib = pytest.mark.skipif(not KNOWN_JAXLIB, reason=f'looks at XLA:CPU programs of jaxlib 0.10-0.11, '
                                        f'not {jaxlib.version.__version__}')

ONEDNN_KNOWN = (xla_cpu.jaxlib_in(xla_cpu.ONEDNN_JAXLIB_VERSIONS)
                and platform.machine().lower() in xla_cpu.ONEDNN_MACHINES)
needs_onednn = pytest.mark.skipif(not ONEDNN_KNOWN, reason=f'oneDNN calls are emitted with jaxlib 0.10 on '
                                  f'x86-64 only, not {jaxlib.version.__version__} on {platform.machine()}')
ONEDNN_CALL = xla_cpu.onednn_call(xla_cpu.ONEDNN_CONVOLUTION)
MATMUL_CALL = xla_cpu.onednn_call(xla_cpu.ONEDNN_MATMUL)


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', code, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize('user_flags, jaxlib_version, scheduler, expected', [
    ('', '0.10.2', 'default', xla_cpu.YNN_FLAG),
    ('--xla_force_host_platform_device_count=4', '0.11.0', 'default',
     f'--xla_force_host_platform_device_count=4 {xla_cpu.YNN_FLAG}'),
    ('--xla_cpu_experimental_ynn_fusion_type=', '0.10.2', 'default', '--xla_cpu_experimental_ynn_fusion_type='),
    ('', '0.12.0', 'default', ''),  # Versions not known to take the flag are left alone.
    ('', '0.9.1', 'default', ''),
    ('', '0.10.2', 'memory_optimized', f'{xla_cpu.YNN_FLAG} {MEMORY_SCHEDULER_FLAG}'),
    ('', '0.12.0', 'memory_optimized', MEMORY_SCHEDULER_FLAG),
    ('--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT', '0.12.0', 'memory_optimized',
     '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT'),  # The user's.
])
def test_xla_flags(monkeypatch, user_flags, jaxlib_version, scheduler, expected):
  monkeypatch.setenv('XLA_FLAGS', user_flags)
  monkeypatch.setattr(jaxlib.version, '__version__', jaxlib_version)
  config = default.get_config()
  config.cpu_scheduler = scheduler
  config.num_cpu_devices = 1
  monkeypatch.setattr(jax.config, 'update', lambda *args: None)  # The backend of this process has started.
  xla_cpu.set_flags(config)
  assert os.environ['XLA_FLAGS'] == expected


@pytest.mark.parametrize('setting, value, message', [
    ('cpu_scheduler', 'memory', r"Unknown cpu_scheduler 'memory'; choose one of default, memory_optimized, "),
    ('cpu_kernels', 'mkl', r"Unknown cpu_kernels 'mkl'; choose one of auto, onednn, xla\.$"),
])
def test_unknown_cpu_settings_are_refused_before_any_flag_is_set(monkeypatch, setting, value, message):
  monkeypatch.setenv('XLA_FLAGS', '')
  config = default.get_config()
  config[setting] = value
  with pytest.raises(ConfigError, match=message):
    xla_cpu.set_flags(config)
  assert os.environ['XLA_FLAGS'] == ''


@pytest.mark.parametrize('num_cpu_devices, batch_sizes, expected', [(1, (16, 4), 1), (-1, (16, 4), 2), (-1, (16, 64), 2),
                                                                   (-1, (18, 9), 1), (-1, (8, 4), 1), (3, (9, 9), 3)])
def test_the_cpu_is_split_into_devices(num_cpu_devices, batch_sizes, expected):
  """num_cpu_devices devices, or for -1 the most (on 2 cores: up to 2) that divide both batch sizes and leave at
  least xla_cpu.MIN_EXAMPLES_PER_DEVICE (8) training examples per device."""
  if num_cpu_devices == -1 and len(os.sched_getaffinity(0)) != 2:
    pytest.skip('the expected counts are those of 2 cores')
  code = ('import sys; from configs import default; from diffusion_jax import xla_cpu; c = default.get_config(); '
          'c.num_cpu_devices, c.training.batch_size, c.sampling.batch_size = map(int, sys.argv[1:]); '
          'xla_cpu.set_flags(c); import jax; print(jax.device_count())')
  result = run_python(code, str(num_cpu_devices), *map(str, batch_sizes), env={'XLA_FLAGS': ''})
  assert result.stdout.strip() == str(expected), result.stderr[-2000:]


@pytest.mark.parametrize('batch_size, num_devices, expected', [(128, 1, 8), (32, 1, 1), (48, 1, 3), (40, 1, 1),
                                                               (256, 4, 4), (16, 2, 1)])
def test_micro_batches_of_16_per_device(batch_size, num_devices, expected):
  assert xla_cpu.micro_batches(batch_size, num_devices) == expected


def test_tune_resolves_only_the_automatic_grad_accum_steps():
  config = tiny_config()
  config.training.batch_size, config.training.grad_accum_steps = 64 * jax.device_count(), 0
  xla_cpu.tune(config)
  assert config.training.grad_accum_steps == 4
  config.training.grad_accum_steps = 2
  xla_cpu.tune(config)
  assert config.training.grad_accum_steps == 2


def test_the_core_does_not_import_the_cpu_module():
  """Training, sampling, evaluation and the builder run without xla_cpu: main.py applies it from outside."""
  code = ('import sys; from diffusion_jax import checkpoints, evaluate, experiment, import_diffusers, sample, train; '
          'print("diffusion_jax.xla_cpu" in sys.modules)')
  result = run_python(code)
  assert result.stdout.strip() == 'False', result.stderr[-2000:]


TRAIN_STEP_PEAK = """
import sys
from configs.tiny import get_config
from diffusion_jax import xla_cpu
config = get_config()
config.cpu_scheduler = sys.argv[1]
config.data.image_size, config.model.ch, config.training.batch_size, config.model.dropout = 16, 16, 32, 0.1
config.model.attn_resolutions = (8,)
xla_cpu.set_flags(config)
import jax, numpy as np
from diffusion_jax import experiment, train
exp = experiment.build(config)
batch = train.shard_batch({'image': np.zeros((32, 16, 16, 1), np.float32), 'label': np.zeros((32,), np.int32)}, exp.mesh)
lowered = train.make_train_step(exp).whole.lower(exp.abstract_state, batch, jax.random.key(1))
print(lowered.compile().memory_analysis().temp_size_in_bytes, flush=True)
"""


@needs_known_jaxlib
@pytest.mark.slow
def test_memory_optimized_scheduler_lowers_the_train_step_peak():
  """XLA's peak temporary memory of a compiled train step is lower with cpu_scheduler='memory_optimized'."""
  default_run, memory_run = (run_python(TRAIN_STEP_PEAK, scheduler, env={'XLA_FLAGS': ''})
                             for scheduler in ('default', 'memory_optimized'))
  assert default_run.returncode == memory_run.returncode == 0, default_run.stderr[-2000:] + memory_run.stderr[-2000:]
  default_peak, memory_peak = int(default_run.stdout), int(memory_run.stdout)
  assert memory_peak < 0.95 * default_peak, (memory_peak, default_peak)


@needs_known_jaxlib
@pytest.mark.slow
def test_ynn_flag_keeps_convolutions_off_ynnpack():
  """With the module's flag XLA:CPU compiles a convolution (on Eigen) without YNNPACK; the user's flag can bring
  it back."""
  code = ('from configs import default; from diffusion_jax import xla_cpu; xla_cpu.set_flags(default.get_config()); '
          'import jax; conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=('
          '"NHWC", "HWIO", "NHWC")); x, w = jax.numpy.ones((2, 16, 16, 64)), jax.numpy.ones((3, 3, 64, 64)); '
          'print("ynn_fusion" in jax.jit(conv).lower(x, w).compile().as_text())')
  project = run_python(code, env={'XLA_FLAGS': ''})
  user = run_python(code, env={'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'})
  assert (project.stdout.strip(), user.stdout.strip()) == ('False', 'True'), project.stderr[-2000:] + user.stderr[-2000:]


RELEASE_AFTER_COMPILE = """
import re
import jax, jax.numpy as jnp
from configs.tiny import get_config
from diffusion_jax import xla_cpu
rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024
blocks = [bytearray(100_000) for _ in range(3000)]  # 300 MB in glibc's heap (blocks below its mmap threshold).
top = bytearray(100_000)  # Allocated last, on top of the heap: glibc then keeps the freed blocks below it.
del blocks
xla_cpu.TRIM_AFTER_COMPILE_SECONDS = 0.0
if __import__('sys').argv[1] == 'tuned':
  xla_cpu.tune(get_config())
before = rss()
jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(3)).compile()
print(before, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc',
                    reason='glibc on Linux only')
@pytest.mark.slow
def test_tune_hands_freed_memory_back_after_a_compilation():
  """After xla_cpu.tune, a compilation is followed by malloc_trim: the 300 MB freed in the heap leave the process."""
  tuned, plain = (run_python(RELEASE_AFTER_COMPILE, kind) for kind in ('tuned', 'plain'))
  (tuned_before, tuned_after), (plain_before, plain_after) = (map(int, r.stdout.split()) for r in (tuned, plain))
  assert tuned_before - tuned_after > 250e6, (tuned_before, tuned_after, tuned.stderr[-2000:])
  assert abs(plain_before - plain_after) < 100e6, (plain_before, plain_after, plain.stderr[-2000:])


@pytest.mark.slow
def test_micro_batched_step_equals_the_whole_batch_with_the_cpu_default(tmp_path):
  """The CPU default's micro-batches give the updates of the whole batch (no dropout), to float32 rounding."""
  from diffusion_jax import experiment, train  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.training.batch_size, config.optim.warmup_steps = 48, 0
  states = {}
  for accum in (1, 0):
    c = config.copy_and_resolve_references()
    c.training.grad_accum_steps = accum
    xla_cpu.tune(c)
    exp = experiment.build(c)
    rng = np.random.default_rng(0)
    batch = {'image': rng.uniform(-1, 1, (48, 8, 8, 1)).astype(np.float32), 'label': np.zeros(48, np.int32)}
    state = exp.init_state(jax.random.key(0))
    step, sharded = train.make_train_step(exp), train.shard_batch(batch, exp.mesh, exp.grad_accum_steps)
    for _ in range(2):  # The warmup's first learning rate is 0.
      state, _ = step(state, sharded, jax.random.key(1))
    states[exp.grad_accum_steps] = state
  assert sorted(states) == [1, 48 // jax.device_count() // 16]
  for a, b in zip(*(jax.tree.leaves(s.params) for s in states.values())):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


PROGRAMS_YNN = """
import re, sys
import numpy as np
from configs.tiny import get_config
from diffusion_jax import xla_cpu
config = get_config()
xla_cpu.set_flags(config)
xla_cpu.tune(config)
import jax
from diffusion_jax import experiment, train
exp = experiment.build(config)
batch = train.shard_batch({'image': np.zeros((8, 8, 8, 1), np.float32), 'label': np.zeros(8, np.int32)}, exp.mesh)
step_text = train.make_train_step(exp).whole.lower(exp.abstract_state, batch, jax.random.key(1)).compile().as_text()
sample_text = exp.sample_fn().lower(exp.abstract_params, jax.random.key(1), 0).compile().as_text()
print(step_text.count('__ynn_fusion'), sample_text.count('__ynn_fusion'))
"""


@needs_known_jaxlib
@pytest.mark.parametrize('user_flags', ['', '--xla_cpu_experimental_ynn_fusion_type=reduce'])
@pytest.mark.slow
def test_samplers_compile_without_ynnpack_unless_the_user_chose(user_flags):
  """After tune, the sampler's program has no YNNPACK fusion while the train step keeps YNNPACK's reductions;
  a YNNPACK setting in the user's XLA_FLAGS applies to both."""
  result = run_python(PROGRAMS_YNN, env={'XLA_FLAGS': user_flags})
  step_fusions, sample_fusions = map(int, result.stdout.split())
  assert step_fusions > 0, result.stderr[-2000:]
  assert (sample_fusions > 0) == bool(user_flags)


def slices_and_dots_conv(x, w, strides, padding, dilation):
  """A second convolution: NHWC x, HWIO w, as a sum of one dot per kernel tap over strided slices of x."""
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  (kh, kw), (sh, sw) = w.shape[:2], strides
  oh, ow = ((x.shape[1 + a] - dilation * (k - 1) - 1) // s + 1 for a, k, s in ((0, kh, sh), (1, kw, sw)))
  return sum(jnp.einsum('nhwc,co->nhwo', x[:, i * dilation:i * dilation + sh * (oh - 1) + 1:sh,
                                            j * dilation:j * dilation + sw * (ow - 1) + 1:sw], w[i, j])
             for i in range(kh) for j in range(kw))


def a_convolution_compiles_to_onednn() -> bool:
  """Whether a 3x3 'SAME' NHWC convolution jitted now has oneDNN's call."""
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return ONEDNN_CALL in jax.jit(conv).lower(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))).compile().as_text()


def value_and_grads(conv):
  return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1)))


@pytest.fixture
def kernels():
  """xla_cpu.set_kernels for the test; the kernels found before it afterwards."""
  before = xla_cpu.kernels()
  yield xla_cpu.set_kernels
  xla_cpu.set_kernels(before)


def in_layout(array, spec):
  """An NHWC image or HWIO kernel array transposed to `spec` (NHWC, NCHW, HWIO or OIHW)."""
  return array.transpose({'NHWC': (0, 1, 2, 3), 'HWIO': (0, 1, 2, 3), 'NCHW': (0, 3, 1, 2), 'OIHW': (3, 2, 0, 1)}[spec])


@needs_onednn
@pytest.mark.parametrize('layout', ['NHWC', 'NCHW'])
@pytest.mark.parametrize('strides, padding, dilation, onednn_calls', [
    ((1, 1), ((1, 1), (1, 1)), 1, 2),  # The U-Net's 3x3 convolutions: forward and input gradient on oneDNN.
    ((2, 2), ((0, 1), (0, 1)), 1, 1),  # Its downsampling: the input gradient dilates its input, so Eigen.
    ((1, 2), ((2, 0), (1, 3)), 2, 1),  # Dilated kernel, unequal strides and padding.
])
def test_onednn_convolutions_equal_slices_and_dots(kernels, layout, strides, padding, dilation, onednn_calls):
  """A convolution, its input and kernel gradients with cpu_kernels='onednn' equal a sum of dots over slices
  (to float32 rounding); the forward and the input gradients without input dilation run as oneDNN's custom call,
  the kernel gradient (a kernel larger than its output) on Eigen."""
  assert kernels('onednn')
  x = jax.random.normal(jax.random.key(0), (2, 11, 10, 5))
  w = jax.random.normal(jax.random.key(1), (3, 3, 5, 7)) * 0.3
  numbers = (layout, 'HWIO' if layout == 'NHWC' else 'OIHW', layout)
  conv = lambda x, w: jax.lax.conv_general_dilated(in_layout(x, layout), in_layout(w, numbers[1]), strides, padding,
                                                   rhs_dilation=(dilation,) * 2, dimension_numbers=numbers)
  program = value_and_grads(conv)
  assert program.lower(x, w).compile().as_text().count(ONEDNN_CALL) == onednn_calls
  expected = value_and_grads(lambda x, w: in_layout(slices_and_dots_conv(x, w, strides, padding, dilation), layout))
  for got, want in zip(jax.tree.leaves(program(x, w)), jax.tree.leaves(expected(x, w))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def grouped_conv(x, w, groups, padding):
  """slices_and_dots_conv of each group of x's and w's channels (stride 1, no dilation), concatenated."""
  cin, cout = x.shape[-1] // groups, w.shape[-1] // groups
  return jnp.concatenate([slices_and_dots_conv(x[..., g * cin:(g + 1) * cin], w[..., g * cout:(g + 1) * cout],
                                               (1, 1), padding, 1) for g in range(groups)], axis=-1)


@needs_onednn
@pytest.mark.parametrize('case', ['xla', 'feature groups', 'bfloat16', 'negative padding', 'one spatial dimension'])
def test_convolutions_that_onednn_does_not_take_keep_jax_lowering(kernels, case):
  """With cpu_kernels='xla', and for grouped (their gradients too: feature and batch groups), bfloat16,
  cropping (negative padding) and 1-D convolutions, no oneDNN call is compiled; the values and gradients equal
  dots over slices."""
  kernels('xla' if case == 'xla' else 'onednn')
  groups = 2 if case == 'feature groups' else 1
  dtype = jnp.bfloat16 if case == 'bfloat16' else jnp.float32
  padding = ((-1, 1), (1, 1)) if case == 'negative padding' else ((1, 1), (1, 1))
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4), dtype)
  w = jax.random.normal(jax.random.key(1), (3, 3, 4 // groups, 6), dtype) * 0.3
  if case == 'one spatial dimension':
    x, w = x[:, 0], w[0]
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1,), ((1, 1),), dimension_numbers=('NWC', 'WIO', 'NWC'))
    reference = lambda x, w: slices_and_dots_conv(x[:, None], w[None], (1, 1), ((0, 0), (1, 1)), 1)[:, 0]
  else:
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), padding, feature_group_count=groups,
                                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if case == 'negative padding':  # The first row cropped, one row of zeros below.
      reference = lambda x, w: slices_and_dots_conv(x[:, 1:], w, (1, 1), ((0, 1), (1, 1)), 1)
    else:
      reference = lambda x, w: grouped_conv(x, w, groups, padding)
  program = value_and_grads(conv)
  assert ONEDNN_CALL not in jax.jit(conv).lower(x, w).compile().as_text()
  if case != 'negative padding':  # Whose input gradient pads, and so runs on oneDNN.
    assert ONEDNN_CALL not in program.lower(x, w).compile().as_text()
  tolerance = 3e-2 if dtype == jnp.bfloat16 else 1e-5
  for got, want in zip(jax.tree.leaves(program(x, w)), jax.tree.leaves(value_and_grads(reference)(x, w))):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tolerance,
                               atol=tolerance * 10)


def test_unknown_cpu_kernels_are_refused_and_unknown_jaxlibs_keep_xla_kernels(kernels, monkeypatch):
  with pytest.raises(ConfigError, match=r"Unknown cpu_kernels 'mkl'; choose one of auto, onednn, xla\.$"):
    kernels('mkl')
  monkeypatch.setattr(xla_cpu, 'cpu_has_avx512', lambda: True)
  for version, machine in (('0.11.0', 'x86_64'), ('0.10.2', 'aarch64')):
    monkeypatch.setattr(jaxlib.version, '__version__', version)
    monkeypatch.setattr(platform, 'machine', lambda machine=machine: machine)
    assert not kernels('onednn')
    assert not kernels('auto')
    assert not a_convolution_compiles_to_onednn()
  monkeypatch.undo()


@needs_onednn
@pytest.mark.parametrize('avx512', [True, False])
def test_auto_convolutions_are_onednn_where_the_cpu_has_avx512(kernels, monkeypatch, avx512):
  monkeypatch.setattr(xla_cpu, 'cpu_has_avx512', lambda: avx512)
  assert kernels('auto') == avx512
  assert xla_cpu.kernels() == ('onednn' if avx512 else 'xla')


@pytest.mark.skipif(not os.path.exists('/proc/cpuinfo') or shutil.which('lscpu') is None, reason='Linux with lscpu')
def test_avx512_is_read_as_lscpu_reads_it():
  lines = subprocess.run([shutil.which('lscpu')], capture_output=True, text=True, check=True,
                         env=dict(os.environ, LC_ALL='C')).stdout.splitlines()
  flags = [line.split() for line in lines if line.startswith('Flags:')]
  if not flags:
    pytest.skip('lscpu lists no CPU flags here')
  assert xla_cpu.cpu_has_avx512() == ('avx512f' in flags[0])


def tiny_config_with(kernels):
  config = tiny_config()
  config.cpu_kernels = kernels
  return config


def test_set_flags_leaves_the_convolutions_and_the_cache_to_tune():
  """set_flags runs before the backend is known (it may be a GPU's): it neither chooses oneDNN nor turns the
  persistent compilation cache off; tune does, on the CPU backend."""
  code = ('from configs import default; from diffusion_jax import xla_cpu; c = default.get_config(); '
          'c.num_cpu_devices, c.cpu_kernels = 1, "onednn"; xla_cpu.set_flags(c); import jax; '
          'print(xla_cpu.kernels(), jax.config.jax_enable_compilation_cache)')
  result = run_python(code, env={'XLA_FLAGS': ''})
  assert result.stdout.split() == ['xla', 'True'], result.stderr[-2000:]


def test_tune_leaves_accelerators_alone(kernels, monkeypatch):
  """On a GPU or TPU backend tune sets nothing: the convolutions' library, the persistent compilation cache and
  the automatic micro-batches stay as they were."""
  kernels('xla')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  cache = jax.config.jax_enable_compilation_cache
  config = tiny_config_with('onednn')
  config.training.grad_accum_steps = 0
  xla_cpu.tune(config)
  assert (xla_cpu.kernels(), jax.config.jax_enable_compilation_cache, config.training.grad_accum_steps) == \
      ('xla', cache, 0)


@needs_onednn
def test_tune_checks_onednn_and_falls_back_to_xla_kernels(kernels, monkeypatch):
  """tune sets the config's kernels, keeps oneDNN where its check against NumPy passes (here), and turns to XLA's
  where it does not."""
  xla_cpu.tune(tiny_config_with('onednn'))
  assert xla_cpu.kernels() == 'onednn'
  assert xla_cpu._onednn_agrees_with_a_reference()  # pylint: disable=protected-access
  xla_cpu.tune(tiny_config_with('xla'))
  assert xla_cpu.kernels() == 'xla'
  monkeypatch.setattr(xla_cpu, '_onednn_agrees_with_a_reference', lambda: False)
  xla_cpu.tune(tiny_config_with('onednn'))
  assert xla_cpu.kernels() == 'xla'
  assert not a_convolution_compiles_to_onednn()


ONEDNN_ON_DEVICES = """
from configs import default
from diffusion_jax import xla_cpu
config = default.get_config()
config.num_cpu_devices, config.cpu_kernels = 2, 'onednn'
xla_cpu.set_flags(config)
xla_cpu.tune(config)
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
mesh = jax.make_mesh((2,), ('batch',))
x = jax.device_put(jnp.ones((4, 8, 8, 4)), NamedSharding(mesh, P('batch')))
w = jax.device_put(jnp.ones((3, 3, 4, 4)), NamedSharding(mesh, P()))
per_device = jax.jit(jax.shard_map(conv, mesh=mesh, in_specs=(P('batch'), P()), out_specs=P('batch')))
two_axes = jax.make_mesh((2, 1), ('batch', 'model'))
x2 = jax.device_put(x, NamedSharding(two_axes, P('batch')))
w2 = jax.device_put(w, NamedSharding(two_axes, P()))
partly_manual = jax.jit(jax.shard_map(conv, mesh=two_axes, in_specs=(P('batch'), P()), out_specs=P('batch'),
                                      axis_names={'batch'}))
for program, args in ((jax.jit(conv), (x, w)), (per_device, (x, w)), (partly_manual, (x2, w2))):
  print(program.lower(*args).compile().as_text().count('__onednn$convolution'), float(program(*args).sum()))
"""


@needs_onednn
def test_onednn_convolutions_run_per_device_only():
  """Over 2 devices, a convolution that XLA splits (jit of sharded arrays; shard_map manual over one of two mesh
  axes) stays on Eigen, one inside shard_map over all axes (per device) runs on oneDNN; all give the same sum
  (of 3x3 windows of ones over 4 channels: interior outputs 36, edges 24, corners 16)."""
  result = run_python(ONEDNN_ON_DEVICES, env={'XLA_FLAGS': ''})
  assert result.returncode == 0, result.stderr[-2000:]
  total = 4 * 4 * (36 * 36 + 4 * 6 * 24 + 4 * 16)  # 4 images x 4 channels of 8x8 outputs.
  assert [line.split() for line in result.stdout.splitlines()] == [['0', f'{total:.1f}'], ['1', f'{total:.1f}'],
                                                                   ['0', f'{total:.1f}']]


ONEDNN_AND_THE_CACHE = """
import os, sys, tempfile, warnings
os.environ['JAX_COMPILATION_CACHE_DIR'] = cache = tempfile.mkdtemp()
from configs import default
from diffusion_jax import xla_cpu
config = default.get_config()
config.num_cpu_devices, config.cpu_kernels = 1, sys.argv[1]
xla_cpu.set_flags(config)
xla_cpu.tune(config)
import jax, jax.numpy as jnp
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  total = float(jax.jit(conv)(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))).sum())
print(total, sum(name.startswith('jit__lambda') for name in os.listdir(cache)), len(caught))
"""


@needs_onednn
def test_onednn_convolutions_turn_the_compilation_cache_off():
  """XLA cannot serialize a program with a oneDNN call (JAX's attempt fails or crashes), so with 'onednn' no
  program is written to the persistent cache and nothing warns; with XLA's kernels the same program is cached."""
  runs = {library: run_python(ONEDNN_AND_THE_CACHE, library, env={'XLA_FLAGS': ''}) for library in ('onednn', 'xla')}
  for library, result in runs.items():
    assert result.returncode == 0, (library, result.stderr[-2000:])
  total = 4 * (36 * 36 + 4 * 6 * 24 + 4 * 16)
  assert runs['onednn'].stdout.split() == [f'{total:.1f}', '0', '0']
  assert runs['xla'].stdout.split() == [f'{total:.1f}', '1', '0']


@needs_onednn
@pytest.mark.slow
def test_a_train_step_with_onednn_equals_xla_kernels(kernels, monkeypatch):
  """Two train steps of the tiny U-Net (dropout, attention, class labels; the second with a learning rate above
  0) give the same loss, gradient norm and parameters, to float32 rounding, with its convolutions and dots (all of
  them, however small, here) on oneDNN and on XLA's kernels; its program has oneDNN's calls of both kinds."""
  monkeypatch.setattr(xla_cpu, 'ONEDNN_MATMUL_MIN_FLOPS', (0, 0))
  from diffusion_jax import experiment, train  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.model.dropout, config.training.batch_size, config.optim.warmup_steps = 0.1, 8, 0
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32), 'label': rng.integers(0, 10, 8, np.int32)}
  results, calls = {}, {}
  for library in ('onednn', 'xla'):
    kernels(library)
    exp = experiment.build(config.copy_and_resolve_references())
    step = train.make_train_step(exp)
    sharded = train.shard_batch(batch, exp.mesh, exp.grad_accum_steps)
    program = step.whole.lower(exp.abstract_state, sharded, jax.random.key(1)).compile().as_text()
    calls[library] = program.count(ONEDNN_CALL), program.count(MATMUL_CALL)
    state = exp.init_state(jax.random.key(0))
    before = jax.tree.map(np.array, state.params)  # Copies: the step donates the state.
    for _ in range(2):  # The warmup's first learning rate is 0.
      state, metrics = step(state, sharded, jax.random.key(1))
    results[library] = (float(metrics['loss']), float(metrics['grad_norm']), state.params)
  assert calls['xla'] == (0, 0) and min(calls['onednn']) > 0, calls
  (loss, grad_norm, params), (xla_loss, xla_grad_norm, xla_params) = results['onednn'], results['xla']
  assert loss == pytest.approx(xla_loss, rel=1e-5) and grad_norm == pytest.approx(xla_grad_norm, rel=1e-4)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before))]
  assert max(moved) > 1e-4  # The second step updated the parameters.
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(xla_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@needs_onednn
def test_onednn_convolutions_count_their_flops_as_xla_does(kernels):
  """perf.cost_flops of a lowered or compiled program counts a oneDNN convolution as XLA's cost analysis counts
  it on Eigen: 2 x batch 2 x 5 output x 4 input features x the 12 x 20 (output, kernel) position pairs of its
  height and width that read the input, not its padding."""
  from diffusion_jax import perf  # pylint: disable=g-import-not-at-top
  conv = lambda x, w: jnp.sin(jax.lax.conv_general_dilated(x, w, (2, 1), ((0, 1), (2, 2)), rhs_dilation=(1, 2),
                                                           dimension_numbers=('NCHW', 'OIHW', 'NCHW')))
  counts = {}
  for library in ('onednn', 'xla'):
    kernels(library)
    lowered = jax.jit(conv).lower(jnp.ones((2, 4, 9, 8)), jnp.ones((5, 4, 3, 3)))
    assert lowered.compile().as_text().count(ONEDNN_CALL) == (library == 'onednn')
    counts[library] = perf.cost_flops(lowered), perf.cost_flops(lowered.compile())
  assert counts['xla'] == counts['onednn'] == (2 * 2 * 5 * 4 * 12 * 20,) * 2


def dense(x, w):
  return jnp.einsum('bhwc,co->bhwo', x, w)


def attention_logits(q, k):
  return jnp.einsum('bic,bjc->bij', q, k)


def transposed_product(a, b):
  return jnp.einsum('bkm,bnk->bmn', a, b)


@needs_onednn
@pytest.mark.parametrize('product, spec, lhs_shape, rhs_shape', [
    (dense, 'bhwc,co->bhwo', (4, 16, 16, 64), (64, 160)),  # A 1x1 projection; its gradients contract (b, h, w), o.
    (attention_logits, 'bic,bjc->bij', (4, 64, 32), (4, 64, 32)),  # Batched; its gradients transpose an operand.
    (transposed_product, 'bkm,bnk->bmn', (3, 48, 40), (3, 56, 48)),
])
def test_onednn_matmuls_equal_xla_dots(kernels, product, spec, lhs_shape, rhs_shape):
  """A dot and its two gradients with cpu_kernels='onednn' run as oneDNN's matmul calls and equal XLA's dots (the
  value also NumPy's float64 einsum) to float32 rounding."""
  x = jax.random.normal(jax.random.key(0), lhs_shape)
  w = jax.random.normal(jax.random.key(1), rhs_shape) * 0.3
  results = {}
  for library in ('onednn', 'xla'):
    kernels(library)
    program = value_and_grads(product)
    assert program.lower(x, w).compile().as_text().count(MATMUL_CALL) == (3 if library == 'onednn' else 0)
    assert jax.jit(product).lower(x, w).compile().as_text().count(MATMUL_CALL) == (library == 'onednn')
    results[library] = program(x, w), jax.jit(product)(x, w)
  (onednn, onednn_value), (xla, _) = results['onednn'], results['xla']
  np.testing.assert_allclose(onednn_value, np.einsum(spec, np.float64(x), np.float64(w)), rtol=1e-4, atol=1e-4)
  for got, want in zip(jax.tree.leaves(onednn), jax.tree.leaves(xla)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize('case, numbers, lhs_shape, rhs_shape, onednn', [
    # (((lhs contracting), (rhs contracting)), ((lhs batch), (rhs batch))) of lax.dot_general.
    ('unbatched, 2^23 FLOPs', (((1,), (0,)), ((), ())), (128, 256), (256, 128), False),
    ('unbatched, 2^24 FLOPs', (((1,), (0,)), ((), ())), (128, 256), (256, 256), True),
    ('batched, 2^18 FLOPs', (((2,), (1,)), ((0,), (0,))), (2, 32, 32), (2, 32, 64), False),
    ('bfloat16', (((1,), (0,)), ((), ())), (512, 256), (256, 256), False),
    ('batch not leading', (((2,), (2,)), ((1,), (0,))), (64, 4, 32), (4, 64, 32), False),
    ('batches in another order', (((3,), (2,)), ((0, 1), (1, 0))), (2, 3, 64, 32), (3, 2, 32, 64), False),
    ('contracting between free', (((0, 2), (0, 1)), ((), ())), (8, 512, 64), (8, 64, 512), False),
    ('contracting pairs crossed', (((1, 2), (1, 0)), ((), ())), (256, 8, 16), (16, 8, 256), False),
    ('contracting pairs reversed', (((2, 1), (1, 0)), ((), ())), (256, 8, 16), (8, 16, 256), True),
])
def test_which_dots_onednn_takes(kernels, case, numbers, lhs_shape, rhs_shape, onednn):
  """oneDNN takes float32 dots from ONEDNN_MATMUL_MIN_FLOPS on whose batch dimensions lead both operands in one
  order and whose contracting dimensions pair up in order (however listed); the others (smaller, bfloat16, other
  batch or contracting dimensions) compile without its call. All equal NumPy's einsum."""
  kernels('onednn')
  dtype = jnp.bfloat16 if case == 'bfloat16' else jnp.float32
  x = jax.random.normal(jax.random.key(0), lhs_shape, dtype)
  w = jax.random.normal(jax.random.key(1), rhs_shape, dtype)
  program = jax.jit(lambda x, w: jax.lax.dot_general(x, w, numbers, preferred_element_type=jnp.float32))
  assert (MATMUL_CALL in program.lower(x, w).compile().as_text()) == onednn
  (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = numbers
  letters = iter('abcdefgh')
  lhs_letters, rhs_letters = [next(letters) for _ in lhs_shape], [None] * len(rhs_shape)
  for l, r in [*zip(lhs_contracting, rhs_contracting), *zip(lhs_batch, rhs_batch)]:
    rhs_letters[r] = lhs_letters[l]
  rhs_letters = [letter or next(letters) for letter in rhs_letters]
  free = lambda names, skip: [n for i, n in enumerate(names) if i not in skip]
  out = ([lhs_letters[d] for d in lhs_batch] + free(lhs_letters, (*lhs_contracting, *lhs_batch))
         + free(rhs_letters, (*rhs_contracting, *rhs_batch)))
  spec = f'{"".join(lhs_letters)},{"".join(rhs_letters)}->{"".join(out)}'
  expected = np.einsum(spec, np.float64(x.astype(jnp.float32)), np.float64(w.astype(jnp.float32)))
  tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-4
  np.testing.assert_allclose(program(x, w), expected, rtol=tolerance, atol=tolerance * 10)


@needs_onednn
@pytest.mark.parametrize('product, lhs_shape, rhs_shape', [
    (transposed_product, (3, 48, 40), (3, 56, 48)),  # lhs stored (K, M).
    (attention_logits, (3, 40, 48), (3, 56, 48)),  # lhs stored (M, K).
])
def test_onednn_matmuls_count_their_flops_as_xla_does(kernels, product, lhs_shape, rhs_shape):
  """perf.cost_flops counts a oneDNN matmul as XLA's cost analysis counts the dot: 2 x batch 3 x 40 x 56
  outputs x 48 products each."""
  from diffusion_jax import perf  # pylint: disable=g-import-not-at-top
  counts = {}
  for library in ('onednn', 'xla'):
    kernels(library)
    lowered = jax.jit(product).lower(jnp.ones(lhs_shape), jnp.ones(rhs_shape))
    assert lowered.compile().as_text().count(MATMUL_CALL) == (library == 'onednn')
    counts[library] = perf.cost_flops(lowered), perf.cost_flops(lowered.compile())
  assert counts['xla'] == counts['onednn'] == (2 * 3 * 40 * 56 * 48,) * 2
