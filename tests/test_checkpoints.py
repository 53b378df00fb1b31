"""The checkpoint layout (pinned by a checkpoint written on 2026-12-03), restoring parts of it, and converting
the workdirs of the earlier layout."""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import FIXTURES
from configs.tiny import get_config as tiny_config
from diffusion_jax import checkpoints, convert_checkpoints, experiment, sample, train
from diffusion_jax.checks import ConfigError

LAYOUT1 = os.path.join(FIXTURES, 'workdir_layout1')  # Written by the code of 2026-12-02 (commit 6a62869): 2 steps.
LAYOUT2 = os.path.join(FIXTURES, 'workdir_layout2')  # Written by the code of 2026-12-03: 2 steps, + sums.json.


def leaf_sums(tree) -> list[float]:
  return [float(np.sum(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)]


def copy_workdir(source: str, tmp_path) -> str:
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  return workdir


@pytest.mark.slow
def test_a_checkpoint_holds_params_ema_optimizer_and_meta_items(tmp_path):
  config = tiny_config()
  config.training.num_train_steps = 2
  state = train.train_and_evaluate(config, str(tmp_path))
  step_dir = tmp_path / 'checkpoints' / '2'
  items = {name for name in os.listdir(step_dir) if os.path.isdir(step_dir / name)}
  assert items == set(checkpoints.ITEMS)
  with open(step_dir / 'meta' / 'metadata') as f:
    assert json.load(f) == {'step': 2, 'layout': checkpoints.LAYOUT}
  raw = {name: ocp.StandardCheckpointer().restore(step_dir / name) for name in ('params', 'ema_params', 'opt_state')}
  assert jax.tree.structure(raw['params']) == jax.tree.structure(jax.device_get(state.params))
  jax.tree.map(np.testing.assert_array_equal, raw['ema_params'], jax.device_get(state.ema_params))
  _, (adam, _) = raw['opt_state']
  assert jax.tree.structure(adam['mu']) == jax.tree.structure(raw['params'])  # Adam's moments are trees.


def test_the_checkpoint_of_2026_12_03_restores(tmp_path):
  """A checkpoint written by the code that introduced this layout restores, whole or its EMA params alone."""
  with open(os.path.join(LAYOUT2, 'sums.json')) as f:
    expected = json.load(f)
  workdir = copy_workdir(LAYOUT2, tmp_path)
  exp = experiment.build(tiny_config())
  state = checkpoints.restore_train_state(checkpoints.manager(workdir), exp.abstract_state)
  assert int(state.step) == 2
  for name in ('params', 'ema_params', 'opt_state'):
    np.testing.assert_allclose(leaf_sums(getattr(state, name)), expected[name], rtol=1e-6, atol=1e-9)
  ema, step = checkpoints.restore_params(checkpoints.manager(workdir), exp.abstract_params)
  assert step == 2
  np.testing.assert_allclose(leaf_sums(ema), expected['ema_params'], rtol=1e-6, atol=1e-9)


def test_sampling_reads_only_the_ema_params(tmp_path):
  """With the optimizer state and raw params deleted from the checkpoint, sample mode still works."""
  workdir = copy_workdir(LAYOUT2, tmp_path)
  for item in ('opt_state', 'params'):
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '2', item))
  out_dir = sample.sample_from_workdir(tiny_config(), workdir)
  assert np.load(os.path.join(out_dir, 'samples.npz'))['images'].shape == (6, 8, 8, 1)


def test_a_workdir_of_the_earlier_layout_is_refused_with_the_fix(tmp_path):
  workdir = copy_workdir(LAYOUT1, tmp_path)
  with pytest.raises(ConfigError, match=r'step 2 .* layout of diffusion_jax before 2026-12-03 .*python -m '
                                        r'diffusion_jax.convert_checkpoints --workdir=WORKDIR'):
    train.train_and_evaluate(tiny_config(), workdir)


@pytest.mark.slow
def test_converted_workdir_holds_the_same_state_and_resumes(tmp_path):
  workdir = copy_workdir(LAYOUT1, tmp_path)
  old = ocp.StandardCheckpointer().restore(os.path.join(LAYOUT1, 'checkpoints', '2', 'default'))
  assert convert_checkpoints.convert_workdir(workdir) == [2]
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', convert_checkpoints.BACKUP, '2', 'default'))  # Kept.
  exp = experiment.build(tiny_config())
  state = checkpoints.restore_train_state(checkpoints.manager(workdir), exp.abstract_state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), old['params'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ema_params), old['ema_params'])
  adam = state.opt_state[1][0]
  np.testing.assert_array_equal(np.concatenate([np.ravel(x) for x in jax.tree.leaves(adam.mu)]),
                                old['opt_state'][1][0]['mu'])
  np.testing.assert_array_equal(np.concatenate([np.ravel(x) for x in jax.tree.leaves(adam.nu)]),
                                old['opt_state'][1][0]['nu'])
  assert int(adam.count) == int(old['opt_state'][1][0]['count']) == 2
  config = tiny_config()
  config.training.num_train_steps = 3
  assert int(train.train_and_evaluate(config, workdir).step) == 3
  with pytest.raises(ConfigError, match=r'No checkpoint of the earlier layout'):
    convert_checkpoints.convert_workdir(workdir)
