"""End to end: train_and_evaluate on a tiny config, resume, sample mode, config overrides and bad input."""
import json
import os
import platform
import re
import signal
import subprocess
import sys

import jax
from jax.extend import random as jax_random
import jaxlib.version
import numpy as np
import pytest
from PIL import Image

from configs import default
from diffusion_jax import distributed, sample, train
from diffusion_jax.models.unet import unet_from_config
from diffusion_jax.schedules import schedule_from_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  config = default.get_config()
  config.data.image_size = 8
  config.model.ch = 8
  config.model.ch_mult = (1, 2)
  config.model.attn_resolutions = (4,)
  config.model.num_groups = 4
  config.diffusion.num_timesteps = 20
  config.training.batch_size = 8
  config.training.num_train_steps = 3
  config.training.log_every_steps = 1
  config.training.checkpoint_every_steps = 2
  config.training.sample_every_steps = 100
  config.sampling.num_steps = 4
  config.sampling.num_samples = 6
  config.sampling.batch_size = 4
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir after 3 steps of training: checkpoints at steps 2 and 3."""
  workdir = str(tmp_path_factory.mktemp('run'))
  state = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, jax.device_get(state)


def test_train_and_evaluate(trained):
  workdir, state = trained
  assert int(state.step) == 3
  assert sorted(train.checkpoint_manager(workdir).all_steps()) == [2, 3]
  grid = np.asarray(Image.open(os.path.join(workdir, 'samples', 'ema_step_3.png')))
  assert grid.shape[:2] == (2 * 8 + 3 * 2, 3 * 8 + 4 * 2)  # 6 samples: 2 rows of 3, 2px borders.
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  params, ema = jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)
  assert any(not np.array_equal(p, e) for p, e in zip(params, ema))  # EMA lags the params.
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['ch'] == 8


def test_resume_continues_from_the_last_checkpoint(trained, tmp_path):
  """Training 3 steps, then 2 more on the same workdir, equals training 5 steps at once."""
  workdir, _ = trained
  resumed_dir = str(tmp_path / 'resumed')
  os.system(f'cp -r {workdir} {resumed_dir}')
  config = tiny_config()
  config.training.num_train_steps = 5
  resumed = jax.device_get(train.train_and_evaluate(config, resumed_dir))
  direct = jax.device_get(train.train_and_evaluate(config, str(tmp_path / 'direct')))
  assert int(resumed.step) == 5
  jax.tree.map(np.testing.assert_array_equal, resumed.params, direct.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.ema_params, direct.ema_params)


def test_sample_mode_writes_png_npz_individual_images_and_the_chain(trained):
  workdir, _ = trained
  config = tiny_config()
  config.sampling.save_individual = True
  config.sampling.chain_frames = 2
  out_dir = sample.sample_from_workdir(config, workdir)
  assert out_dir == os.path.join(workdir, 'samples', 'ddim4_eta1.0_uniform_ema_seed1_step3')
  saved = np.load(os.path.join(out_dir, 'samples.npz'))
  assert saved['images'].shape == (6, 8, 8, 1) and saved['images'].dtype == np.uint8
  assert int(saved['step']) == 3 and 'labels' not in saved
  grid = np.asarray(Image.open(os.path.join(out_dir, 'grid.png')))
  assert grid.shape[:2] == (22, 32)
  assert sorted(os.listdir(os.path.join(out_dir, 'images'))) == [f'{i:05d}.png' for i in range(6)]
  np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out_dir, 'images', '00005.png'))),
                                saved['images'][5, ..., 0])
  # Chain of the first batch (4 images): x_T, after steps 2 and 4 -> 3 frames; its last column is the samples.
  strip = np.asarray(Image.open(os.path.join(out_dir, 'chain.png')))
  assert strip.shape == (4 * 10 + 2, 3 * 10 + 2)
  np.testing.assert_array_equal(strip[2:10, 22:30], saved['images'][0, ..., 0])
  gif = Image.open(os.path.join(out_dir, 'chain.gif'))
  assert gif.n_frames == 3
  gif.seek(2)
  np.testing.assert_array_equal(np.asarray(gif.convert('L'))[2:10, 2:10], saved['images'][0, ..., 0])
  again = np.load(os.path.join(sample.sample_from_workdir(tiny_config(), workdir), 'samples.npz'))['images']
  np.testing.assert_array_equal(again, saved['images'])  # Deterministic given sampling.seed.
  # The first batch comes from the chain-recording sampler; without a chain, the plain one gives the same images.
  config.sampling.chain_images = 0
  plain = np.load(os.path.join(sample.sample_from_workdir(config, workdir), 'samples.npz'))['images']
  np.testing.assert_array_equal(plain, saved['images'])


def test_sample_mode_errors(trained):
  workdir, _ = trained
  config = tiny_config()
  config.sampling.checkpoint_step = 1
  with pytest.raises(ValueError, match=r'No checkpoint at step 1 in .*available steps: \[2, 3\]'):
    sample.sample_from_workdir(config, workdir)
  config = tiny_config()
  config.sampling.num_samples = 0
  with pytest.raises(ValueError, match=r'sampling.num_samples must be a positive integer, got 0'):
    sample.sample_from_workdir(config, workdir)


def test_compare_mode_writes_one_labelled_row_per_sampler_and_weights(trained):
  workdir, _ = trained
  config = tiny_config()
  config.sampling.compare_images = 4
  config.sampling.compare_steps = (2, 5)
  path = sample.compare_from_workdir(config, workdir)
  assert path == os.path.join(workdir, 'samples', 'compare_seed1_step3.png')
  picture = np.asarray(Image.open(path))
  # Rows: (DDPM-20, DDIM-2, DDIM-5) x (EMA, raw), each a 4-image row of 8px + 2px borders, upscaled x2.
  assert picture.shape[0] == 6 * 2 * (8 + 2 * 2) and picture.shape[2] == 3


def test_interpolate_mode_inverts_reconstructs_and_interpolates(trained, tmp_path):
  workdir, _ = trained
  config = tiny_config()
  config.sampling.compare_steps = (2, 20)
  config.sampling.interpolate_steps = 20
  config.sampling.interpolate_frames = 3
  out_dir = sample.interpolate_from_workdir(config, workdir)
  assert out_dir == os.path.join(workdir, 'samples', 'interpolate_step3')
  strip = np.asarray(Image.open(os.path.join(out_dir, 'interpolation.png')))
  assert strip.shape == (12, 5 * 10 + 2)  # The two images with 3 interpolated frames between them.
  assert Image.open(os.path.join(out_dir, 'interpolation.gif')).n_frames == 4  # Frames 0, 1, 2, 1.
  with open(os.path.join(out_dir, 'reconstruction.json')) as f:
    mse = json.load(f)['reconstruction_mse_by_ddim_steps']
  assert set(mse) == {'2', '20'} and all(0 <= v < 4 for v in mse.values())
  # The end frames decode the inverted images themselves: close to the originals for 20 steps.
  originals = strip[2:10, [2, 42]]
  np.testing.assert_allclose(strip[2:10, [12, 32]].astype(float), originals.astype(float), atol=64)

  small, large = tmp_path / 'small.png', tmp_path / 'large.png'
  Image.new('L', (8, 8)).save(small)
  Image.new('L', (9, 8)).save(large)
  config.sampling.interpolate_files = (str(small), str(large))
  with pytest.raises(ValueError, match=r'images of different sizes: .*small.png is 8x8 and .*large.png is 9x8'):
    sample.interpolate_from_workdir(config, workdir)


def test_workdir_of_another_architecture_is_refused(trained):
  workdir, _ = trained
  config = tiny_config()
  config.model.ch = 16
  with pytest.raises(ValueError, match=r'another architecture.*model.ch: checkpoint 8 vs config 16'):
    train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize('section, key, value, message', [
    ('data', 'dataset', 'imagenet', r"Unknown dataset 'imagenet'; choose one of .*'digits'"),
    ('sampling', 'method', 'euler', r"Unknown sampler 'euler'; choose one of \['ddim', 'ddpm', 'dpm\+\+2m'\]"),
    ('diffusion', 'schedule', 'cubic', r"Unknown noise schedule 'cubic'"),
    ('training', 'batch_size', 0, r'training.batch_size=0 must be a positive multiple'),
    ('model', 'attn_resolutions', (3,), r'attention resolution\(s\) \[3\] never occur'),
])
def test_bad_config_is_refused_before_any_work(section, key, value, message, tmp_path):
  config = tiny_config()
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


TINY_FLAGS = ('--config.data.image_size=8', '--config.model.ch=8', '--config.model.ch_mult=(1,2)',
              '--config.model.attn_resolutions=(4,)', '--config.model.num_groups=4', '--config.training.batch_size=4',
              '--config.diffusion.num_timesteps=10', '--config.sampling.num_steps=2', '--config.sampling.num_samples=4',
              '--config.sampling.batch_size=4')


def run_main(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, 'main.py', *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)


def test_main_without_workdir_is_a_one_line_error():
  result = run_main('--config=configs/default.py')
  assert result.returncode != 0
  assert 'Flag --workdir must have a value other than None' in result.stderr


def test_main_unknown_dataset_error_names_the_allowed_values(tmp_path):
  result = run_main('--config=configs/default.py', f'--workdir={tmp_path}', '--config.data.dataset=mnist2')
  assert result.returncode != 0
  assert "Unknown dataset 'mnist2'; choose one of" in result.stderr
  assert 'Traceback' not in result.stderr


def test_config_override_from_the_command_line(tmp_path):
  """--config.a.b=value reaches train_and_evaluate (seen in the saved config.json), and trains."""
  result = run_main('--config=configs/default.py', f'--workdir={tmp_path}', *TINY_FLAGS,
                    '--config.training.num_train_steps=1')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'config.json') as f:
    saved = json.load(f)
  assert saved['model']['ch'] == 8 and saved['model']['ch_mult'] == [1, 2]
  assert saved['training']['num_train_steps'] == 1
  assert os.path.exists(tmp_path / 'samples' / 'ema_step_1.png')


@pytest.mark.parametrize('signal_number', [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_saves_a_checkpoint_and_resumes_from_it(tmp_path, signal_number):
  """Ctrl-C (SIGINT) or kill (SIGTERM) mid-run saves the current step; the next run resumes there."""
  args = [sys.executable, 'main.py', '--config=configs/default.py', f'--workdir={tmp_path}', *TINY_FLAGS,
          '--config.training.num_train_steps=100000', '--config.training.checkpoint_every_steps=100000',
          '--config.training.log_every_steps=5']
  process = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), stderr=subprocess.PIPE,
                             text=True)
  for line in process.stderr:
    if '] [10] ' in line and 'loss=' in line:  # Step 10 is logged: training is under way.
      process.send_signal(signal_number)
      break
  rest = process.communicate(timeout=300)[1]
  assert process.returncode == 0, rest[-3000:]
  steps = train.checkpoint_manager(str(tmp_path)).all_steps()
  assert len(steps) == 1 and 10 <= steps[0] < 100000
  result = run_main('--config=configs/default.py', f'--workdir={tmp_path}', *TINY_FLAGS,
                    f'--config.training.num_train_steps={steps[0] + 2}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resumed from the checkpoint at step {steps[0]}.' in result.stderr
  assert sorted(train.checkpoint_manager(str(tmp_path)).all_steps())[-1] == steps[0] + 2


def test_compilation_cache_from_the_config_unless_the_environment_sets_one(tmp_path):
  code = ('import jax; from diffusion_jax import distributed; distributed.enable_compilation_cache({!r}); '
          'print(jax.config.jax_compilation_cache_dir)')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  run = lambda path, env: subprocess.run([sys.executable, '-c', code.format(path)], cwd=REPO, env=env,
                                         capture_output=True, text=True, timeout=120)
  assert run(str(tmp_path / 'cache'), env).stdout.strip() == str(tmp_path / 'cache')
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / 'from_env')
  assert run(str(tmp_path / 'cache'), env).stdout.strip() == str(tmp_path / 'from_env')


MEMORY_SCHEDULER_FLAG = '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'


@pytest.mark.parametrize('user_flags, jaxlib_version, scheduler, expected', [
    ('', '0.10.2', 'default', distributed.CPU_XLA_FLAG),
    ('--xla_force_host_platform_device_count=4', '0.11.0', 'default',
     f'--xla_force_host_platform_device_count=4 {distributed.CPU_XLA_FLAG}'),
    ('--xla_cpu_experimental_ynn_fusion_type=', '0.10.2', 'default', '--xla_cpu_experimental_ynn_fusion_type='),
    ('', '0.12.0', 'default', ''),  # Versions not known to take the flag are left alone.
    ('', '0.9.1', 'default', ''),
    ('', '0.10.2', 'memory_optimized', f'{distributed.CPU_XLA_FLAG} {MEMORY_SCHEDULER_FLAG}'),
    ('', '0.12.0', 'memory_optimized', MEMORY_SCHEDULER_FLAG),
    ('--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT', '0.12.0', 'memory_optimized',
     '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT'),  # The user's.
])
def test_cpu_xla_flags(monkeypatch, user_flags, jaxlib_version, scheduler, expected):
  monkeypatch.setenv('XLA_FLAGS', user_flags)
  monkeypatch.setattr(jaxlib.version, '__version__', jaxlib_version)
  distributed.set_cpu_xla_flags(scheduler)
  assert os.environ['XLA_FLAGS'] == expected


def test_unknown_cpu_scheduler(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '')
  with pytest.raises(ValueError, match=r"Unknown cpu_scheduler 'memory'; choose one of default, memory_optimized, "):
    distributed.configure_cpu_devices(1, (8,), 'memory')
  assert os.environ['XLA_FLAGS'] == ''


TRAIN_STEP_PEAK = """
import sys
sys.path[:0] = ['tests', '.']
from diffusion_jax import distributed
distributed.configure_cpu_devices(1, (32,), sys.argv[1])
import jax, numpy as np
from test_train import tiny_config
from diffusion_jax import train
from diffusion_jax.models.unet import unet_from_config
from diffusion_jax.schedules import schedule_from_config
config = tiny_config()
config.data.image_size, config.model.ch, config.training.batch_size, config.model.dropout = 16, 16, 32, 0.1
config.model.attn_resolutions = (8,)
mesh = train.create_mesh()
model, tx = unet_from_config(config.model), train.create_optimizer(config.optim)
state = jax.eval_shape(lambda k: train.create_train_state(config, model, tx, k), jax.random.key(0))
batch = train.shard_batch({'image': np.zeros((32, 16, 16, 1), np.float32), 'label': np.zeros((32,), np.int32)}, mesh)
step = train.make_train_step(config, model, tx, schedule_from_config(config.diffusion), mesh)
print(step.lower(state, batch, jax.random.key(1)).compile().memory_analysis().temp_size_in_bytes, flush=True)
"""


def test_memory_optimized_scheduler_lowers_the_train_step_peak():
  """XLA's peak temporary memory of a compiled train step is lower with cpu_scheduler='memory_optimized'."""
  run = lambda scheduler: subprocess.run([sys.executable, '-c', TRAIN_STEP_PEAK, scheduler], cwd=REPO,
                                         env=dict(os.environ, XLA_FLAGS=''), capture_output=True, text=True,
                                         timeout=300)
  default_run, memory_run = run('default'), run('memory_optimized')
  assert default_run.returncode == memory_run.returncode == 0, default_run.stderr[-2000:] + memory_run.stderr[-2000:]
  default_peak, memory_peak = int(default_run.stdout), int(memory_run.stdout)
  assert memory_peak < 0.95 * default_peak, (memory_peak, default_peak)  # 0.90 with jaxlib 0.10.2.


def test_cpu_xla_flag_keeps_convolutions_off_ynnpack():
  """With the project's flag XLA:CPU compiles a convolution without YNNPACK; the user's flag can bring it back."""
  code = ('from diffusion_jax import distributed; distributed.configure_cpu_devices(1, (1,), "default"); import jax; '
          'conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", '
          '"NHWC")); x, w = jax.numpy.ones((2, 16, 16, 64)), jax.numpy.ones((3, 3, 64, 64)); '
          'print("ynn_fusion" in jax.jit(conv).lower(x, w).compile().as_text())')
  run = lambda flags: subprocess.run([sys.executable, '-c', code], cwd=REPO, env=dict(os.environ, XLA_FLAGS=flags),
                                     capture_output=True, text=True, timeout=120)
  project, user = run(''), run('--xla_cpu_experimental_ynn_fusion_type=individual_convolution')
  assert (project.stdout.strip(), user.stdout.strip()) == ('False', 'True'), (project.stderr[-2000:] +
                                                                               user.stderr[-2000:])


FORWARD, INITIALIZER = distributed.forward_compiler_options, distributed.initializer_compiler_options


@pytest.mark.parametrize('options, user_flags, jaxlib_version, expected', [
    (FORWARD, distributed.CPU_XLA_FLAG, '0.10.2', {'xla_cpu_experimental_ynn_fusion_type': ''}),
    (FORWARD, '--xla_force_host_platform_device_count=2', '0.11.0', {'xla_cpu_experimental_ynn_fusion_type': ''}),
    (FORWARD, '--xla_cpu_experimental_ynn_fusion_type=individual_convolution', '0.10.2', {}),  # The user's choice.
    (FORWARD, '', '0.12.0', {}),  # Versions not known to take the option.
    (INITIALIZER, '', '0.10.2', {distributed.FUSION_EMITTERS_OPTION: False}),
    (INITIALIZER, f'--{distributed.FUSION_EMITTERS_OPTION}=true', '0.11.0', {}),
    (INITIALIZER, '', '0.12.0', {}),
])
def test_per_program_compiler_options(monkeypatch, options, user_flags, jaxlib_version, expected):
  monkeypatch.setenv('XLA_FLAGS', user_flags)
  monkeypatch.setattr(jaxlib.version, '__version__', jaxlib_version)
  assert options() == expected


def test_run_initializer_gives_the_state_of_a_plain_jit_and_drops_its_program():
  """The initializer compiled for one run gives bit for bit the state of jax.jit's default compilation, for a
  class-conditional model too (whose label embedding is drawn from a normal distribution); its compiled program
  is gone when it returns, though the caller keeps init_fn."""
  assert distributed.initializer_compiler_options()  # This CPU and jaxlib compile the initializer differently.
  config = tiny_config()
  config.model.num_classes = 3
  model, tx = unet_from_config(config.model), train.create_optimizer(config.optim)
  init = lambda key: train.create_train_state(config, model, tx, key)
  key, mesh, client = jax.random.key(5), train.create_mesh(), jax.devices()[0].client
  num_programs = len(client.live_executables())
  ours = train.run_initializer(init, key, mesh)
  assert len(client.live_executables()) == num_programs
  plain = jax.jit(init)(key)
  assert jax.tree.structure(ours) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)
  assert np.std(ours.params['label_embedding']['embedding']) > 0.1  # Drawn (std 1/sqrt(32)), not zeros.


def test_samplers_compile_without_ynnpack_and_the_train_step_with_it():
  """On the CPU the sampler's program has no YNNPACK fusion; the train step keeps YNNPACK's reductions."""
  config = tiny_config()
  mesh = train.create_mesh()
  model, tx = unet_from_config(config.model), train.create_optimizer(config.optim)
  state = jax.eval_shape(lambda key: train.create_train_state(config, model, tx, key), jax.random.key(0))
  size = config.data.image_size
  batch = train.shard_batch({'image': np.zeros((8, size, size, 1), np.float32), 'label': np.zeros((8,), np.int32)},
                            mesh)
  step = train.make_train_step(config, model, tx, schedule_from_config(config.diffusion), mesh)
  step_text = step.lower(state, batch, jax.random.key(1)).compile().as_text()
  sample_fn = train.sample_fn_from_config(config, model, mesh)
  sample_text = sample_fn.lower(state.params, jax.random.key(1), 0).compile().as_text()
  ynn_computations = set(re.findall(r'calls=(%[\w.\-]+)[^\n]*"kind":"__ynn_fusion"', step_text))
  reductions = {block.split()[0] for block in step_text.split('\n\n')
                if re.search(r'ROOT %\S+ = \S+ reduce\(', block)}
  assert ynn_computations & reductions  # YNNPACK runs reductions of the train step.
  assert '__ynn_fusion' not in sample_text


THREEFRY_BITS = """
import sys
import jax, numpy as np
from diffusion_jax import distributed
if sys.argv[1] == 'ours':
  distributed.unroll_threefry_on_cpu()
key = jax.random.key(7)
bits = jax.jit(lambda key: jax.random.bits(key, (5000,)))(key)
normal = jax.jit(lambda key: jax.random.normal(jax.random.fold_in(jax.random.split(key)[1], 3), (5000,)))(key)
per_key = jax.jit(jax.vmap(lambda k: jax.random.bits(k, (1024,))))(jax.random.split(key, 8))  # Keys (8, 1).
for size in (8, distributed.UNROLL_THREEFRY_FROM_SIZE):
  print(jax.jit(lambda key: jax.random.bits(key, (size,))).lower(key).as_text().count('stablehlo.while'), end=' ')
print(int(np.bitwise_xor.reduce(np.asarray(bits))), *(np.asarray(a).tobytes().hex() for a in (normal, per_key)))
"""


@pytest.mark.parametrize('size', [1, distributed.UNROLL_THREEFRY_FROM_SIZE])
def test_threefry_on_cpu_meets_the_test_vectors(size):
  """Our Threefry lowering, a loop below UNROLL_THREEFRY_FROM_SIZE numbers and unrolled from there, gives the
  published Threefry-2x32-20 outputs."""
  distributed.unroll_threefry_on_cpu()
  known_answers = [  # (key, counter, output), Random123's kat_vectors for threefry2x32_20.
      ((0, 0), (0, 0), (0x6b200159, 0x99ba4efe)),
      ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
      ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0)),
  ]
  hash_fn = jax.jit(lambda key, count: jax_random.threefry_2x32(key, count))
  for key, counter, output in known_answers:
    counts = np.repeat(np.uint32(counter), size)  # The counter's two words, each repeated size times.
    expected = np.repeat(np.uint32(output), size)
    np.testing.assert_array_equal(hash_fn(np.uint32(key), counts), expected)


def test_threefry_on_cpu_gives_jax_bits():
  """Random bits, splits and normals equal those of JAX's own lowering, which is a loop at every size."""
  run = lambda lowering: subprocess.run([sys.executable, '-c', THREEFRY_BITS, lowering], cwd=REPO,
                                        capture_output=True, text=True, timeout=120)
  jaxs, ours = run('jax'), run('ours')
  assert jaxs.returncode == ours.returncode == 0, jaxs.stderr[-2000:] + ours.stderr[-2000:]
  assert jaxs.stdout.split()[:2] == ['1', '1']  # JAX's lowering is a loop.
  assert ours.stdout.split()[:2] == ['1', '0']  # Ours: a loop for 8 numbers, unrolled for the larger arrays.
  assert ours.stdout.split()[2:] == jaxs.stdout.split()[2:]


@pytest.mark.parametrize('module, first_use', [
    # TensorFlow (0.6 GiB): the tf.data input pipeline loads it.
    ('tensorflow', 'from diffusion_jax import input_pipeline; from configs import default; next(input_pipeline.'
                   'create_iterator(input_pipeline.load_dataset(default.get_config().data), 4, 0))'),
    # orbax (25 MB): a checkpoint manager loads it.
    ('orbax.checkpoint', 'import tempfile; train.checkpoint_manager(tempfile.mkdtemp())'),
], ids=['tensorflow', 'orbax'])
def test_heavy_module_is_imported_only_where_used(module, first_use):
  """Importing main.py's modules and the samplers does not load `module`; its first use does."""
  code = (f'import sys; import main; from diffusion_jax import evaluate, sample, sampling, train; '
          f'print({module!r} in sys.modules); {first_use}; print({module!r} in sys.modules)')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.stdout.split() == ['False', 'True'], result.stderr[-3000:]


RELEASE_FREED_MEMORY = """
import re
from diffusion_jax import distributed
rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024
blocks = [bytearray(100_000) for _ in range(3000)]  # 300 MB in glibc's heap (blocks below its mmap threshold).
top = bytearray(100_000)  # Allocated last, on top of the heap: glibc then keeps the freed blocks below it.
del blocks
print(rss(), flush=True)
distributed.release_freed_memory()
print(rss())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc',
                    reason='glibc on Linux only')
def test_release_freed_memory_returns_the_heap_to_the_os():
  result = subprocess.run([sys.executable, '-c', RELEASE_FREED_MEMORY], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  before, after = (int(line) for line in result.stdout.split())
  assert before - after > 250e6, (before, after, result.stderr[-2000:])
