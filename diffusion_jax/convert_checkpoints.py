"""Converts the checkpoints of a workdir written before 2026-12-03 (layout 1) to today's layout (checkpoints.py).

  python -m diffusion_jax.convert_checkpoints --workdir=WORKDIR

Layout 1 kept the whole train state as one 'default' item, with Adam's moments as flat vectors of all the
params' numbers and a tree of offsets into them. Each such checkpoints/<step>/ is moved to
checkpoints/layout1/<step>/ (kept, never deleted) and written anew with the same params, EMA params and
Adam state as trees; training then resumes exactly where it stopped.
"""
import json
import os
import shutil
import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import checkpoints, optim, workdir_lock
from diffusion_jax.checks import ConfigError, ProjectError
from diffusion_jax.train_state import TrainState

FLAGS = flags.FLAGS
BACKUP = 'layout1'  # checkpoints/BACKUP/<step>/: the converted checkpoints as they were.


def state_from_layout1(saved: dict, tx) -> TrainState:
  """The train state of a layout-1 checkpoint restored as raw arrays (dict with step, params, ema_params,
  opt_state, param_offsets), with Adam's moments cut out of the flat vectors into trees like the params."""
  params = jax.tree.map(jnp.asarray, saved['params'])
  leaves, treedef = jax.tree.flatten(params)
  offsets = treedef.flatten_up_to(saved['param_offsets'])
  unflat = lambda vector: treedef.unflatten([jnp.asarray(vector[int(o):int(o) + x.size]).reshape(x.shape)
                                             for x, o in zip(leaves, offsets)])
  _, (adam, schedule) = saved['opt_state']
  clip_state, (adam_state, schedule_state) = tx.init(params)
  opt_state = (clip_state, (adam_state._replace(count=jnp.asarray(adam['count']), mu=unflat(adam['mu']),
                                                nu=unflat(adam['nu'])),
                            schedule_state._replace(count=jnp.asarray(schedule['count']))))
  return TrainState(step=jnp.asarray(saved['step'], jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.asarray, saved['ema_params']), opt_state=opt_state)


def convert_workdir(workdir: str) -> list[int]:
  """Converts every layout-1 checkpoint of workdir in place; returns the converted steps."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(name) for name in (os.listdir(directory) if os.path.isdir(directory) else ())
                 if name.isdigit() and os.path.isdir(os.path.join(directory, name, 'default')))
  if not steps:
    raise ConfigError(f'No checkpoint of the earlier layout (checkpoints/<step>/default) in {directory}.')
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  tx = optim.create_optimizer(saved.optim, saved.training.num_train_steps)
  states = {step: state_from_layout1(ocp.StandardCheckpointer().restore(
      os.path.join(directory, str(step), 'default')), tx) for step in steps}
  os.makedirs(os.path.join(directory, BACKUP), exist_ok=True)
  for step in steps:
    shutil.move(os.path.join(directory, str(step)), os.path.join(directory, BACKUP, str(step)))
  manager = checkpoints.manager(workdir, keep=len(steps))
  for step in steps:
    checkpoints.save(manager, states[step])
    checkpoints.wait_until_finished(manager)
    logging.info('Converted the checkpoint at step %d (the original is in %s).', step,
                 os.path.join(directory, BACKUP, str(step)))
  return steps


def main(argv):
  del argv
  try:
    with workdir_lock.hold(FLAGS.workdir):  # Not while a training run writes there.
      steps = convert_workdir(FLAGS.workdir)
  except ProjectError as e:
    sys.exit(f'convert_checkpoints: {e}')
  print(f'Converted the checkpoints at steps {steps} of {FLAGS.workdir}.')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'The workdir whose checkpoints/ to convert in place.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
