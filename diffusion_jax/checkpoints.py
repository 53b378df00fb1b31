"""Checkpoints and the workdir guard.

A workdir holds config.json (the config of its first run) and checkpoints/<step>/, one orbax checkpoint per
saved step with four items:
  params/      the model parameters, a tree like the model's (`model.init(...)['params']`);
  ema_params/  their exponential moving average, a tree like params: what sample, eval and import use;
  opt_state/   optax's state of the optimizer for the params tree (Adam's count, mu and nu);
  meta/        JSON {"step": int, "layout": LAYOUT}.
Sampling and evaluation restore ema_params (or params) alone, without building the optimizer, and never
write into checkpoints/. When the newest checkpoint does not restore (truncated, deleted or garbled files),
training warns and resumes from the newest one that does, after moving the bad ones to
checkpoints/unrestorable/<step>_<time>/ (sampling and evaluation only warn). The guard refuses a workdir whose
config.json describes another architecture.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil

from absl import logging
from etils import epath, epy
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import files
from diffusion_jax.checks import CheckpointError, ConfigError, MissingFileError, WorkdirError
from diffusion_jax.train_state import TrainState

with epy.lazy_imports():  # orbax (25 MB) is loaded by the first checkpoint manager: a sampler or a step needs none.
  import orbax.checkpoint as ocp

LAYOUT = 2  # 1: one 'default' item holding the whole state, with Adam's moments as flat vectors (until 2026-12).
ITEMS = ('params', 'ema_params', 'opt_state', 'meta')
# Restore errors that say nothing about the files (memory, a storage service's hiccup): raised, never walked past.
TRANSIENT_ERRORS = ('RESOURCE_EXHAUSTED', 'UNAVAILABLE', 'DEADLINE_EXCEEDED', 'Out of memory')
UNRESTORABLE = 'unrestorable'  # checkpoints/unrestorable/<step>_<time>: checkpoints that did not restore.
# Config entries that fix the shapes and meaning of a checkpoint's parameters (dropout does not).
ARCHITECTURE_KEYS = ('model.ch', 'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions',
                     'model.resamp_with_conv', 'model.num_groups', 'data.image_size', 'data.channels',
                     'model.num_classes', 'diffusion.parameterization')
ADDED_ARCHITECTURE_KEYS = {'model.num_classes': 0}  # Added after the first release, with their earlier meaning.


def manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  """The checkpoint manager of workdir/checkpoints, keeping the newest `keep` steps.

  read_only (sample, compare, interpolate, eval): it never creates, deletes or writes anything there.
  """
  handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS[:3]}
  handlers['meta'] = ocp.JsonCheckpointHandler()
  options = (ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0) if read_only else
             ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
  return ocp.CheckpointManager(checkpoints_dir(workdir), options=options, item_handlers=handlers)


def checkpoints_dir(workdir: str) -> str:
  directory = os.path.join(workdir, 'checkpoints')
  return directory if '://' in workdir else os.path.abspath(directory)  # Orbax wants an absolute local path.


def save(checkpoints: ocp.CheckpointManager, state: TrainState) -> None:
  """Saves state at its step (asynchronously: `wait_until_finished(checkpoints)` before exiting).

  Raises a WorkdirError naming the directory and the newest complete checkpoint when this save, or the
  previous one still being written, fails (a full disk, no permission, a read-only file system).
  """
  step = int(state.step)
  with _write_errors(checkpoints, step):
    _check_room(checkpoints, state)
    checkpoints.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params), ema_params=ocp.args.StandardSave(state.ema_params),
        opt_state=ocp.args.StandardSave(state.opt_state), meta=ocp.args.JsonSave({'step': step, 'layout': LAYOUT})))


def _check_room(checkpoints: ocp.CheckpointManager, state: TrainState) -> None:
  """Raises an OSError before writing anything when a local checkpoints folder cannot take this checkpoint:
  not writable (permissions, a read-only file system) or without room for the state's bytes (+10%, +1 MiB).

  Failing here keeps the error to one line; orbax's background writers, failing midway, also log a
  traceback per array.
  """
  directory = str(checkpoints.directory)
  if '://' in directory:
    return
  if not os.access(directory, os.W_OK):
    error = errno.EROFS if os.statvfs(directory).f_flag & os.ST_RDONLY else errno.EACCES
    raise OSError(error, os.strerror(error), directory)
  needed = 1.1 * sum(x.nbytes for x in jax.tree.leaves(state)) + 2**20
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise OSError(errno.ENOSPC, f'{os.strerror(errno.ENOSPC)} (the checkpoint needs {needed / 2**20:.1f} MiB, '
                  f'{free / 2**20:.1f} MiB are free)', directory)


def wait_until_finished(checkpoints: ocp.CheckpointManager) -> None:
  """Waits for the checkpoint being written; a WorkdirError as `save`'s if it fails."""
  with _write_errors(checkpoints, None):
    checkpoints.wait_until_finished()


@contextlib.contextmanager
def _write_errors(checkpoints: ocp.CheckpointManager, step: int | None):
  try:
    yield
  except Exception as e:  # Orbax and TensorStore report a failed write as OSError, ValueError or RuntimeError.
    reason = files.os_error_reason(e)
    if reason is None:
      raise
    checkpoints.reload()
    kept = checkpoints.latest_step()
    saving = 'a checkpoint' if step is None else f'the checkpoint of step {step}'
    raise WorkdirError(f'Cannot write {saving} to {checkpoints.directory}: {reason}. '
                       + ('No checkpoint has been written yet.' if kept is None else
                          f'The newest complete checkpoint is at step {kept}; free space or fix permissions and '
                          f'train again to resume from it.')) from e


def _is_earlier_layout(checkpoints: ocp.CheckpointManager, step: int) -> bool:
  return os.path.isdir(os.path.join(str(checkpoints.directory), str(step), 'default'))


def _restore_step(checkpoints: ocp.CheckpointManager, step: int, abstract_items: dict) -> dict:
  if _is_earlier_layout(checkpoints, step):
    raise ConfigError(f'The checkpoint at step {step} in {checkpoints.directory} has the layout of diffusion_jax '
                      'before 2026-12-03 (one "default" item with a flat optimizer state); convert its workdir with '
                      '`python -m diffusion_jax.convert_checkpoints --workdir=WORKDIR`.')
  args = {name: ocp.args.StandardRestore(abstract) for name, abstract in abstract_items.items()}
  restored = checkpoints.restore(step, args=ocp.args.Composite(**args))
  return {name: restored[name] for name in abstract_items}


def _restore(checkpoints: ocp.CheckpointManager, step: int | None, move_aside: bool,
             **abstract_items) -> tuple[dict, int]:
  """The items of checkpoint `step`; step None: of the newest checkpoint that restores (see restore_train_state)."""
  available = sorted(checkpoints.all_steps(), reverse=True)
  if not available:
    raise MissingFileError(f'No checkpoint in {checkpoints.directory}.')
  if step is not None and step not in available:
    raise ConfigError(f'No checkpoint at step {step} in {checkpoints.directory}; available steps: '
                      f'{sorted(available)}.')
  failed = {}
  for candidate in available if step is None else [step]:
    items, reason = None, None
    try:
      items = _restore_step(checkpoints, candidate, abstract_items)
    except ConfigError:
      raise
    except Exception as e:  # Orbax and TensorStore raise many types for missing, truncated or garbled files.
      reason = _root_cause(e)
      if any(word in reason for word in TRANSIENT_ERRORS) or isinstance(e, (MemoryError, TimeoutError)):
        raise  # Not a damaged checkpoint: nothing is moved, the next run tries it again.
    if _any_process(reason is not None):  # All processes walk back together.
      failed[candidate] = reason or 'another process could not read its part'
      logging.warning('Cannot restore the checkpoint at step %d in %s (%s).', candidate, checkpoints.directory,
                      failed[candidate])
      continue
    if failed and move_aside:
      _move_aside(checkpoints, failed)
    return items, candidate
  tried = '; '.join(f'step {s}: {reason}' for s, reason in failed.items())
  raise CheckpointError(f'Cannot restore {"any checkpoint" if step is None else f"the checkpoint at step {step}"} '
                        f'in {checkpoints.directory} ({tried}).')


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _root_cause(error: BaseException) -> str:
  """'Type: first line' of the innermost exception that `error` was raised from (TensorStore's says which file)."""
  for _ in range(32):
    if (error.__cause__ or error.__context__) is None:
      break
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0] if lines else ""}'[:300]


def _move_aside(checkpoints: ocp.CheckpointManager, failed: dict) -> None:
  """Renames the checkpoints of `failed` steps to checkpoints/unrestorable/<step>_<time> (never deletes them)."""
  directory = epath.Path(checkpoints.directory)
  stamp = datetime.datetime.now().strftime('%Y%m%dT%H%M%S')
  if jax.process_index() == 0:
    (directory / UNRESTORABLE).mkdir(exist_ok=True)
    for step in failed:
      target = directory / UNRESTORABLE / f'{step}_{stamp}'
      (directory / str(step)).rename(target)
      logging.warning('Moved the checkpoint of step %d, which does not restore, to %s.', step, target)
  multihost_utils.sync_global_devices('checkpoints moved aside')
  checkpoints.reload()


def restore_train_state(checkpoints: ocp.CheckpointManager, abstract_state: TrainState,
                        step: int | None = None) -> TrainState:
  """The state at `step`, in the shapes, dtypes and shardings of abstract_state (for training).

  step None: the newest checkpoint that restores; newer ones that do not are moved to
  checkpoints/unrestorable/ with a warning naming the step and the reason (a CheckpointError naming every
  step tried when none restores). A given step that does not restore is a CheckpointError.
  """
  items, step = _restore(checkpoints, step, True, params=abstract_state.params, ema_params=abstract_state.ema_params,
                         opt_state=abstract_state.opt_state)
  step_array = jax.device_put(jnp.asarray(step, jnp.int32), abstract_state.step.sharding)
  return TrainState(step=step_array, **items)


def restore_params(checkpoints: ocp.CheckpointManager, abstract_params, step: int | None = None,
                   use_ema: bool = True) -> tuple[object, int]:
  """(ema_params or params at `step`, that step), without the optimizer state.

  step None: the newest checkpoint that restores, with a warning for each newer one that does not (nothing
  is moved: reading modes never write into checkpoints/).
  """
  item = 'ema_params' if use_ema else 'params'
  items, step = _restore(checkpoints, step, False, **{item: abstract_params})
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
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    return
  saved = ml_collections.ConfigDict(json.loads(path.read_text()))
  old, new = architecture(saved), architecture(config)
  diffs = [f'{k}: checkpoint {old[k]} vs config {new[k]}' for k in new if old.get(k) != new[k]]
  if diffs:
    raise ConfigError(f'The workdir {workdir} holds a run of another architecture; use a new --workdir or the '
                      f'same settings. Differences: ' + '; '.join(diffs))


def write_workdir_config(config, workdir: str) -> None:
  """Writes workdir/config.json (process 0, if there is none yet): whole, then renamed, so no one reads half."""
  path = epath.Path(workdir) / 'config.json'
  if jax.process_index() == 0 and not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + '.tmp')
    temporary.write_text(config.to_json_best_effort(indent=2))
    temporary.rename(path)
