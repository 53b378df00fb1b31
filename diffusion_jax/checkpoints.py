"""Checkpoints and the workdir guard.

A workdir holds config.json (the config of its first run) and checkpoints/<step>/, one orbax checkpoint per
saved step with four items:
  params/      the model parameters, a tree like the model's (`model.init(...)['params']`);
  ema_params/  their exponential moving average, a tree like params: what sample, eval and import use;
  opt_state/   optax's state of the optimizer for the params tree (Adam's count, mu and nu);
  meta/        JSON {"step": int, "layout": LAYOUT}.
Sampling and evaluation restore ema_params (or params) alone, without building the optimizer. The guard
refuses a workdir whose config.json describes another architecture.
"""
from __future__ import annotations

import json
import os

from etils import epy
import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax.checks import ConfigError
from diffusion_jax.train_state import TrainState

with epy.lazy_imports():  # orbax (25 MB) is loaded by the first checkpoint manager: a sampler or a step needs none.
  import orbax.checkpoint as ocp

LAYOUT = 2  # 1: one 'default' item holding the whole state, with Adam's moments as flat vectors (until 2026-12).
ITEMS = ('params', 'ema_params', 'opt_state', 'meta')
# Config entries that fix the shapes and meaning of a checkpoint's parameters (dropout does not).
ARCHITECTURE_KEYS = ('model.ch', 'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions',
                     'model.resamp_with_conv', 'model.num_groups', 'data.image_size', 'data.channels',
                     'model.num_classes', 'diffusion.parameterization')
ADDED_ARCHITECTURE_KEYS = {'model.num_classes': 0}  # Added after the first release, with their earlier meaning.


def manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
  """The checkpoint manager of workdir/checkpoints, keeping the newest `keep` steps."""
  handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS[:3]}
  handlers['meta'] = ocp.JsonCheckpointHandler()
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
                               item_handlers=handlers)


def save(checkpoints: ocp.CheckpointManager, state: TrainState) -> None:
  """Saves state at its step (asynchronously: `checkpoints.wait_until_finished()` before exiting)."""
  step = int(state.step)
  checkpoints.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params), ema_params=ocp.args.StandardSave(state.ema_params),
      opt_state=ocp.args.StandardSave(state.opt_state), meta=ocp.args.JsonSave({'step': step, 'layout': LAYOUT})))


def _check_step(checkpoints: ocp.CheckpointManager, step: int | None) -> int:
  """The step to restore (None: the latest); a ConfigError when there is none or it is of an earlier layout."""
  available = checkpoints.all_steps()
  if not available:
    raise ConfigError(f'No checkpoint in {checkpoints.directory}.')
  step = max(available) if step is None else step
  if step not in available:
    raise ConfigError(f'No checkpoint at step {step} in {checkpoints.directory}; available steps: '
                      f'{sorted(available)}.')
  if os.path.isdir(os.path.join(str(checkpoints.directory), str(step), 'default')):
    raise ConfigError(f'The checkpoint at step {step} in {checkpoints.directory} has the layout of diffusion_jax '
                      'before 2026-12-03 (one "default" item with a flat optimizer state); convert its workdir with '
                      '`python -m diffusion_jax.convert_checkpoints --workdir=WORKDIR`.')
  return step


def _restore(checkpoints: ocp.CheckpointManager, step: int | None, **abstract_items) -> tuple[dict, int]:
  step = _check_step(checkpoints, step)
  args = {name: ocp.args.StandardRestore(abstract) for name, abstract in abstract_items.items()}
  try:
    restored = checkpoints.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # Orbax raises several types for corrupt or mismatched files.
    raise ConfigError(f'Cannot restore the checkpoint at step {step} in {checkpoints.directory}: '
                      f'{type(e).__name__}: {e}') from e
  return {name: restored[name] for name in abstract_items}, step


def restore_train_state(checkpoints: ocp.CheckpointManager, abstract_state: TrainState,
                        step: int | None = None) -> TrainState:
  """The state at `step` (None: the latest), in the shapes, dtypes and shardings of abstract_state."""
  items, step = _restore(checkpoints, step, params=abstract_state.params, ema_params=abstract_state.ema_params,
                         opt_state=abstract_state.opt_state)
  step_array = jax.device_put(jnp.asarray(step, jnp.int32), abstract_state.step.sharding)
  return TrainState(step=step_array, **items)


def restore_params(checkpoints: ocp.CheckpointManager, abstract_params, step: int | None = None,
                   use_ema: bool = True) -> tuple[object, int]:
  """(ema_params or params at `step` (None: the latest), that step), without the optimizer state."""
  item = 'ema_params' if use_ema else 'params'
  items, step = _restore(checkpoints, step, **{item: abstract_params})
  return items[item], step


def architecture(config) -> dict:
  """The config entries that must match between a checkpoint and the config restoring it.

  Entries missing from an older workdir's config.json take the value they had before they existed.
  """
  flat = {}
  for key in ARCHITECTURE_KEYS:
    section, name = key.split('.')
    flat[key] = config[section].get(name, ADDED_ARCHITECTURE_KEYS.get(key))
  return json.loads(json.dumps(flat))  # Tuples become lists, as in the saved JSON.


def check_workdir_config(config, workdir: str) -> None:
  """Raises a ConfigError when workdir's config.json describes another architecture than config."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  old, new = architecture(saved), architecture(config)
  diffs = [f'{k}: checkpoint {old[k]} vs config {new[k]}' for k in new if old.get(k) != new[k]]
  if diffs:
    raise ConfigError(f'The workdir {workdir} holds a run of another architecture; use a new --workdir or the '
                      f'same settings. Differences: ' + '; '.join(diffs))


def write_workdir_config(config, workdir: str) -> None:
  """Writes workdir/config.json (process 0, if there is none yet): whole, then renamed, so no one reads half."""
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() == 0 and not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + '.tmp', path)
