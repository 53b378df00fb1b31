"""End to end: train_and_evaluate on a tiny config, resume, sample mode, config overrides and bad input."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from configs.tiny import get_config as tiny_config
from diffusion_jax import checkpoints, diffusion, experiment, sample, train


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir after 3 steps of training: checkpoints at steps 2 and 3."""
  workdir = str(tmp_path_factory.mktemp('run'))
  state = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, jax.device_get(state)


@pytest.mark.slow
def test_train_and_evaluate(trained):
  workdir, state = trained
  assert int(state.step) == 3
  assert sorted(checkpoints.manager(workdir).all_steps()) == [2, 3]
  grid = np.asarray(Image.open(os.path.join(workdir, 'samples', 'ema_step_3.png')))
  assert grid.shape[:2] == (2 * 8 + 3 * 2, 3 * 8 + 4 * 2)  # 6 samples: 2 rows of 3, 2px borders.
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  params, ema = jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)
  assert any(not np.array_equal(p, e) for p, e in zip(params, ema))  # EMA lags the params.
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['ch'] == 8


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_compare_mode_writes_one_labelled_row_per_sampler_and_weights(trained):
  workdir, _ = trained
  config = tiny_config()
  config.sampling.compare_images = 4
  config.sampling.compare_steps = (2, 5)
  path = sample.compare_from_workdir(config, workdir)
  assert path == os.path.join(workdir, 'samples', 'compare_seed1_step3.png')
  picture = np.asarray(Image.open(path))
  # Rows: (DDPM-20, then DDIM, Heun and Euler-a at 2 and at 5 model calls) x (EMA, raw), each a 4-image row of
  # 8px + 2px borders, upscaled x2.
  assert picture.shape[0] == 14 * 2 * (8 + 2 * 2) and picture.shape[2] == 3


@pytest.mark.slow
def test_sample_mode_with_heun(trained):
  """--mode=sample with a Karras sampler: its run name, the samples, and a chain of x_T and 2 recorded states."""
  workdir, _ = trained
  config = tiny_config()
  config.sampling.method, config.sampling.eta, config.sampling.chain_frames = 'heun', 0.0, 2
  out_dir = sample.sample_from_workdir(config, workdir)
  assert out_dir == os.path.join(workdir, 'samples', 'heun4_karras_rho7.0_ema_seed1_step3')
  saved = np.load(os.path.join(out_dir, 'samples.npz'))['images']
  assert saved.shape == (6, 8, 8, 1) and len(np.unique(saved)) > 2
  assert Image.open(os.path.join(out_dir, 'chain.gif')).n_frames == 3
  config.sampling.method, config.sampling.s_churn = 'euler', 1.0
  assert sample.run_name(config) == 'euler4_churn1.0_tmin0.0_tmaxinf_noise1.0_karras_rho7.0_ema_seed1'


@pytest.mark.slow
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


@pytest.mark.slow
def test_workdir_of_another_architecture_is_refused(trained):
  workdir, _ = trained
  config = tiny_config()
  config.model.ch = 16
  with pytest.raises(ValueError, match=r'another architecture.*model.ch: checkpoint 8 vs config 16'):
    train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize('section, key, value, message', [
    ('data', 'dataset', 'imagenet', r"Unknown dataset 'imagenet'; choose one of .*'digits'"),
    ('sampling', 'method', 'pndm',
     r"Unknown sampler 'pndm'; choose one of \['ddim', 'ddpm', 'dpm\+\+2m', 'euler', 'euler_a', 'heun'\]"),
    ('sampling', 'rho', 0.0, r'sampling.rho must be > 0 \(Karras et al. use 7\), got 0.0'),
    ('diffusion', 'loss_weighting', 'p2', r"Unknown loss weighting 'p2'; choose one of \['min_snr', 'none'\]"),
    ('diffusion', 'snr_gamma', 0.0, r'diffusion.snr_gamma must be > 0 .*got 0.0'),
    ('diffusion', 'schedule', 'cubic', r"Unknown noise schedule 'cubic'"),
    ('optim', 'lr_decay', 'linear', r"Unknown learning-rate decay 'linear'; choose one of \['constant', 'cosine'\]"),
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


MAIN_WITH_FAILING_TRAINING = """
import sys
from absl import app
import main
from diffusion_jax import checks, train
errors = {'ours': checks.ConfigError('training.x=1 is wrong; set it to 2.'), 'value': ValueError('a bug'),
          'runtime': RuntimeError('another bug')}
error = errors[sys.argv[1]]
def fail(config, workdir):
  raise error
train.train_and_evaluate = fail
sys.argv = ['main.py', '--config=configs/tiny.py', '--workdir=' + sys.argv[2]]
app.run(main.main)
"""


@pytest.mark.parametrize('error', ['ours', 'value', 'runtime'])
def test_main_prints_only_its_own_errors_as_one_line(error, tmp_path):
  """A ConfigError is one line on stderr; any other exception (a ValueError too) keeps its traceback."""
  result = subprocess.run([sys.executable, '-c', MAIN_WITH_FAILING_TRAINING, error, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  if error == 'ours':
    assert result.stderr.strip().splitlines()[-1] == 'main.py: training.x=1 is wrong; set it to 2.'
    assert 'Traceback' not in result.stderr
  else:
    assert 'Traceback' in result.stderr and ('ValueError: a bug' in result.stderr or
                                             'RuntimeError: another bug' in result.stderr)


@pytest.mark.slow
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
@pytest.mark.slow
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
  steps = checkpoints.manager(str(tmp_path)).all_steps()
  assert len(steps) == 1 and 10 <= steps[0] < 100000
  result = run_main('--config=configs/default.py', f'--workdir={tmp_path}', *TINY_FLAGS,
                    f'--config.training.num_train_steps={steps[0] + 2}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resumed from the checkpoint at step {steps[0]}.' in result.stderr
  assert sorted(checkpoints.manager(str(tmp_path)).all_steps())[-1] == steps[0] + 2


@pytest.mark.slow
def test_compilation_cache_from_the_config_unless_the_environment_sets_one(tmp_path):
  code = ('import jax; from diffusion_jax import runtime; runtime.enable_compilation_cache({!r}); '
          'print(jax.config.jax_compilation_cache_dir)')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  run = lambda path, env: subprocess.run([sys.executable, '-c', code.format(path)], cwd=REPO, env=env,
                                         capture_output=True, text=True, timeout=120)
  assert run(str(tmp_path / 'cache'), env).stdout.strip() == str(tmp_path / 'cache')
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / 'from_env')
  assert run(str(tmp_path / 'cache'), env).stdout.strip() == str(tmp_path / 'from_env')


@pytest.mark.parametrize('module, first_use', [
    # TensorFlow (0.6 GiB): clu's TensorBoard writer loads it (the digits' batches do not: tests/test_perf.py).
    ('tensorflow', 'import tempfile; from diffusion_jax import writers; writers.create(tempfile.mkdtemp())'),
    # orbax (25 MB): a checkpoint manager loads it.
    ('orbax.checkpoint', 'import tempfile; checkpoints.manager(tempfile.mkdtemp())'),
], ids=['tensorflow', 'orbax'])
@pytest.mark.slow
def test_heavy_module_is_imported_only_where_used(module, first_use):
  """Importing main.py's modules and the samplers does not load `module`; its first use does."""
  code = (f'import sys; import main; from diffusion_jax import checkpoints, evaluate, sample, sampling, train; '
          f'print({module!r} in sys.modules); {first_use}; print({module!r} in sys.modules)')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.stdout.split() == ['False', 'True'], result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize('parameterization', ['eps', 'v'])
def test_train_step_loss_has_the_min_snr_weights(parameterization):
  """The step's loss is the mean over examples of min-SNR weight x per-example MSE, recomputed by hand from the
  step's draws, the weights from the betas in float64 (eps: min(SNR, 5) / SNR; v: min(SNR, 5) / (SNR + 1))."""
  config = tiny_config()
  config.diffusion.parameterization, config.diffusion.loss_weighting = parameterization, 'min_snr'
  exp = experiment.build(config)
  state = exp.init_state(jax.random.key(0))
  images = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
  step_rng = jax.random.key(7)
  t, noise, _ = train.example_randomness(jax.random.split(jax.random.fold_in(step_rng, 0))[0], jnp.arange(8),
                                         config.diffusion.num_timesteps, (8, 8, 1), 0.0)
  x_t = diffusion.q_sample(exp.schedule, jnp.asarray(images), t, noise)
  target = diffusion.training_target(exp.schedule, t, jnp.asarray(images), noise, parameterization)
  mse = np.asarray(jnp.mean((exp.model.apply({'params': state.params}, x_t, t, None) - target) ** 2, axis=(1, 2, 3)))
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, config.diffusion.num_timesteps))[np.asarray(t)]
  snr = ab / (1 - ab)
  weights = np.minimum(snr, 5.0) / (snr if parameterization == 'eps' else snr + 1)
  assert np.ptp(weights) > 0.1  # The draws span weights that matter.
  _, metrics = train.make_train_step(exp)(state, train.shard_batch({'image': images}, exp.mesh), step_rng)
  np.testing.assert_allclose(float(metrics['loss']), np.mean(weights * mse), rtol=1e-5)


@pytest.mark.parametrize('accum', [1, 2])
def test_the_step_compiled_ahead_from_the_abstract_state_equals_the_jitted_step(accum):
  """train_and_evaluate compiles the step from exp.abstract_state and batch_spec before the state exists: the
  compiled programs give bit for bit the jitted step's state and metrics, and only compiled steps count FLOPs."""
  config = tiny_config()
  config.training.grad_accum_steps = accum
  exp = experiment.build(config)
  step_fn = train.make_train_step(exp)
  compiled = step_fn.compile(exp.abstract_state, train.batch_spec(exp), jax.random.key(3))
  images = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
  batch = train.shard_batch({'image': images, 'label': np.zeros((8,), np.int32)}, exp.mesh, accum)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), batch) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                           train.batch_spec(exp))
  outputs = [fn(exp.init_state(jax.random.key(0)), batch, jax.random.key(3)) for fn in (step_fn, compiled)]
  assert int(outputs[1][0].step) == 1
  jax.tree.map(np.testing.assert_array_equal, *jax.device_get(outputs))
  assert compiled.flops(exp.mesh.size) > 1e6
  with pytest.raises(TypeError, match='needs a compiled step'):
    step_fn.flops(exp.mesh.size)
