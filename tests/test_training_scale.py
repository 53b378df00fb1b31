"""Training at scale: devices, hosts, bit-identical resume after SIGKILL, EMA, event files, bad input."""
import ast
import functools
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import REPO
from configs import default
from configs.tiny import get_config as tiny_config
from diffusion_jax import checkpoints, experiment, optim, train, train_state

SCRIPT = os.path.join(REPO, 'tests', 'run_tiny_training.py')


def run_script(args, devices=1, check=True):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(process):
  _, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]


def assert_same_training(run, reference):
  """The runs in directories run and reference (out.npz, and event files in run/) trained alike.

  The logged loss and gradient norm (the norm of the gradient of the global batch-mean loss, before
  clipping) agree to 1e-5 at every step. Params and EMA params agree to float32 rounding amplified
  by Adam: in its first steps Adam moves each parameter by about +-lr whatever the gradient's size,
  so where a gradient is zero up to rounding (summed in another order across devices) a parameter can
  move the other way: single entries may differ by up to the sum of the learning rates (6e-5 here),
  while the whole tree must agree to 1e-4 relative (seen: 1e-5).
  """
  _, run_scalars = scalars(run / 'run')
  _, reference_scalars = scalars(reference / 'run')
  for tag in ('loss', 'grad_norm'):
    assert [s for s, _ in run_scalars[tag]] == [s for s, _ in reference_scalars[tag]], tag
    np.testing.assert_allclose([v for _, v in run_scalars[tag]], [v for _, v in reference_scalars[tag]],
                               rtol=1e-5, err_msg=tag)
  a, b = np.load(run / 'out.npz'), np.load(reference / 'out.npz')
  assert set(a.files) == set(b.files)
  keys = [k for k in a.files if '/' in k]
  for key in keys:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4, err_msg=key)
  for kind in ('params/', 'ema/'):
    difference = np.sqrt(sum(((a[k] - b[k]).astype(np.float64)**2).sum() for k in keys if k.startswith(kind)))
    norm = np.sqrt(sum((b[k].astype(np.float64)**2).sum() for k in keys if k.startswith(kind)))
    assert difference < 1e-4 * norm, (kind, difference / norm)


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('one')
  finish(run_script([tmp / 'run', tmp / 'out.npz'], devices=1))
  assert int(np.load(tmp / 'out.npz')['devices']) == 1
  return tmp


@pytest.mark.slow
def test_eight_devices_equal_one_device(one_device_run, tmp_path):
  """Global batch 8 over 8 simulated devices trains to the same params as over 1 device."""
  finish(run_script([tmp_path / 'run', tmp_path / 'out.npz'], devices=8))
  assert int(np.load(tmp_path / 'out.npz')['devices']) == 8
  assert_same_training(tmp_path, one_device_run)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(one_device_run, tmp_path):
  """4 devices x 2 micro-batches of 4 train like 1 device with the whole batch of 8 (no dropout)."""
  finish(run_script([tmp_path / 'run', tmp_path / 'out.npz', 4, 2], devices=4))
  assert int(np.load(tmp_path / 'out.npz')['devices']) == 4
  assert_same_training(tmp_path, one_device_run)


def test_gradient_accumulation_must_divide_the_batch():
  config = tiny_config()
  config.training.grad_accum_steps = 3
  with pytest.raises(ValueError, match=r'grad_accum_steps=3 must be .*training.batch_size=8 is a multiple of grad_accum_steps '
                                       r'x the 2 devices'):
    experiment.check_config(config, 2)


def test_gradient_accumulation_setting_must_be_a_count():
  config = tiny_config()
  config.training.grad_accum_steps = 0
  experiment.check_config(config, 2)  # Automatic.
  config.training.grad_accum_steps = -1
  with pytest.raises(ValueError, match=r'grad_accum_steps=-1 must be 0 \(automatic\) or a positive integer'):
    experiment.check_config(config, 2)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(one_device_run, tmp_path):
  """Two processes on 127.0.0.1 (through launch/local.sh), each reading half of every batch, train like one."""
  command = ['bash', os.path.join(REPO, 'launch', 'local.sh'), '--num-processes', '2', '--port', str(free_port()),
             '--devices-per-process', '1', '--log-dir', str(tmp_path), '--', sys.executable, SCRIPT,
             str(tmp_path / 'run'), str(tmp_path / 'out.npz'), '4']
  result = subprocess.run(command, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:] + open(tmp_path / 'process_1.log').read()[-3000:]
  two = np.load(tmp_path / 'out.npz')
  assert int(two['processes']) == 2 and int(two['devices']) == 2
  assert_same_training(tmp_path, one_device_run)


def scalars(workdir):
  """The event files' reader, and {tag: [(step, value)]} of its scalar summaries."""
  import tensorflow as tf
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={'tensors': 0, 'scalars': 0})
  events.Reload()
  values = {tag: [(e.step, tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]
            for tag in events.Tags()['tensors']}
  return events, {tag: [(step, float(v)) for step, v in pairs] for tag, pairs in values.items()
                  if pairs and np.ndim(pairs[0][1]) == 0 and np.issubdtype(pairs[0][1].dtype, np.number)}


def override_flags(config, base) -> list[str]:
  """The --config.KEY=VALUE flags that make main.py's base config into config."""
  flags = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flags += [flag.replace('--config.', f'--config.{key}.', 1) for flag in override_flags(value, base[key])]
    elif value != base[key]:
      flags.append(f'--config.{key}={value}')
  return flags


def test_override_flags_rebuild_the_config():
  config = tiny_config()
  flags = override_flags(config, default.get_config())
  assert '--config.model.ch_mult=(1, 2)' in flags and '--config.diffusion.num_timesteps=20' in flags
  rebuilt = default.get_config()
  for flag in flags:
    path, value = flag[len('--config.'):].split('=', 1)
    *parents, key = path.split('.')
    node = functools.reduce(getattr, parents, rebuilt)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):  # A string field, given bare as on main.py's command line.
      pass
    setattr(node, key, value)
  assert rebuilt.to_dict() == config.to_dict()


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
  """Train 12 steps straight; separately, SIGKILL between checkpoints and resume to 12: identical results."""
  straight = tmp_path / 'straight'
  finish(run_script([straight, tmp_path / 'straight.npz', 12]))

  killed = tmp_path / 'killed'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  config = tiny_config()
  config.training.checkpoint_every_steps, config.training.num_train_steps = 4, 100000
  flags = override_flags(config, default.get_config())
  process = subprocess.Popen([sys.executable, 'main.py', '--config=configs/default.py', f'--workdir={killed}', *flags],
                             cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  for line in process.stderr:
    # Kill after the (asynchronous) checkpoint of step 4 is complete, at a step that is not a checkpoint.
    step = re.search(r'\] \[(\d+)\] .*loss=', line)
    if step and int(step.group(1)) % 4 and os.path.isdir(killed / 'checkpoints' / '4'):
      process.send_signal(signal.SIGKILL)
      break
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL
  assert 4 in checkpoints.manager(str(killed)).all_steps()
  finish(run_script([killed, tmp_path / 'killed.npz', 12]))

  a, b = np.load(tmp_path / 'straight.npz'), np.load(tmp_path / 'killed.npz')
  for key in a.files:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  _, straight_scalars = scalars(straight)
  _, killed_scalars = scalars(killed)
  straight_losses = dict(straight_scalars['loss'])
  killed_losses = dict(killed_scalars['loss'])  # Steps 5-6 were logged twice: before the kill and after resume.
  assert sorted(killed_losses) == list(range(1, 13))
  assert killed_losses == straight_losses


@pytest.mark.slow
def test_event_files_hold_the_scalars_and_images(tmp_path):
  config = tiny_config()
  config.training.num_train_steps = 2
  train.train_and_evaluate(config, str(tmp_path))
  events, values = scalars(tmp_path)
  for tag in ('loss', 'grad_norm', 'param_norm', 'learning_rate', 'ema_decay', 'perf/steps_per_sec',
              'perf/images_per_sec'):
    assert tag in values, sorted(values)
  assert [step for step, _ in values['loss']] == [1, 2]
  # Warmup: learning rate at step 0 and 1 (metrics report the rate used by that step).
  lr = dict(values['learning_rate'])
  np.testing.assert_allclose([lr[1], lr[2]], [0.0, config.optim.learning_rate / config.optim.warmup_steps], rtol=1e-6)
  assert 'ema_samples' in events.Tags()['tensors']


def test_ema_equals_the_closed_form(tmp_path):
  """After k steps, ema = prod(d) p_0 + sum_i (1 - d_i) prod_{j>i} d_j p_i, with the warmed-up decays."""
  config = tiny_config()
  exp = experiment.build(config)
  mesh = exp.mesh
  state = exp.init_state(jax.random.key(0))
  step_fn = train.make_train_step(exp)
  params_sequence = [jax.device_get(state.params)]
  decays = []
  rng = np.random.default_rng(0)
  for _ in range(4):
    batch = {'image': rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32), 'label': np.zeros(8, np.int32)}
    state, metrics = step_fn(state, train.shard_batch(batch, mesh), jax.random.key(1))
    params_sequence.append(jax.device_get(state.params))
    decays.append(float(metrics['ema_decay']))
  np.testing.assert_allclose(decays, [min(0.999, (1 + s) / (10 + s)) for s in range(4)], rtol=1e-6)

  def closed_form(*leaves):
    p = [np.asarray(x, np.float64) for x in leaves]
    ema = np.prod(decays) * p[0]
    for i, d in enumerate(decays):
      ema = ema + (1 - d) * np.prod(decays[i + 1:]) * p[i + 1]
    return ema

  expected = jax.tree.map(closed_form, *params_sequence)
  jax.tree.map(lambda e, x: np.testing.assert_allclose(e, x, rtol=1e-5, atol=1e-7), jax.device_get(state.ema_params),
               expected)
  assert jax.tree.leaves(state.ema_params)[0] is not jax.tree.leaves(state.params)[0]


def test_learning_rate_schedules_against_the_closed_form():
  config = tiny_config()
  config.optim.learning_rate, config.optim.warmup_steps = 2e-3, 10
  constant = optim.learning_rate_schedule(config.optim, 110)
  config.optim.lr_decay = 'cosine'
  cosine = optim.learning_rate_schedule(config.optim, 110)
  for step in (0, 5, 10):  # The same linear warmup.
    assert float(constant(step)) == pytest.approx(float(cosine(step))) == pytest.approx(2e-3 * step / 10)
  for step in (10, 35, 60, 85, 110):  # lr (1 + cos(pi (s - warmup) / (T - warmup))) / 2, then 0.
    assert float(cosine(step)) == pytest.approx(1e-3 * (1 + np.cos(np.pi * (step - 10) / 100)), abs=1e-9)
    assert float(constant(step)) == pytest.approx(2e-3)
  assert float(cosine(200)) == pytest.approx(0.0, abs=1e-9)


def test_apply_update_is_optax_and_the_ema_on_the_params_tree():
  """apply_update against optax and the EMA written out on the tree, for 3 steps of warmup with gradient clipping
  active in some of them; the optimizer state is optax's own, a tree like the params."""
  config = tiny_config()
  config.optim.warmup_steps, config.optim.grad_clip = 2, 3.0
  tx = optim.create_optimizer(config.optim, config.training.num_train_steps)
  rng = np.random.default_rng(0)
  shapes = {'conv': {'kernel': (3, 3, 2, 4), 'bias': (4,)}, 'norm': {'scale': (4,), 'bias': (4,)}, 'out': (5, 3)}
  draw = lambda scale: jax.tree.map(lambda s: (scale * rng.normal(size=s)).astype(np.float32), shapes,
                                    is_leaf=lambda x: isinstance(x, tuple))
  params = draw(1.0)
  state = train_state.create(params, tx)
  step = jax.jit(lambda state, grads, decay: train_state.apply_update(state, grads, tx, decay))
  tree_params, tree_ema, tree_opt_state = params, params, tx.init(params)
  for decay, scale in [(0.5, 0.1), (0.9, 10.0), (0.99, 1.0)]:
    grads = draw(scale)
    state = step(state, grads, decay)
    updates, tree_opt_state = tx.update(grads, tree_opt_state, tree_params)
    tree_params = optax.apply_updates(tree_params, updates)
    tree_ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, tree_ema, tree_params)
  assert int(state.step) == 3
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
  jax.tree.map(close, state.params, tree_params)
  jax.tree.map(close, state.ema_params, tree_ema)
  jax.tree.map(close, state.opt_state, tree_opt_state)
  assert jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(params)
  assert not np.allclose(state.params['out'], params['out'])


def test_batch_not_divisible_by_devices():
  config = tiny_config()
  config.training.batch_size = 6
  with pytest.raises(ValueError, match=r'training.batch_size=6 must be a positive multiple of the 4 devices'):
    experiment.check_config(config, 4)
