"""Turns a diffusers UNet2DModel checkpoint into a workdir that `main.py --mode=sample` (or train) can use.

  python -m diffusion_jax.import_diffusers --config=configs/cifar10.py \
      --model_dir=ddpm-cifar10-32 --workdir=runs/ddpm-cifar10-official
  python main.py --config=configs/cifar10.py --workdir=runs/ddpm-cifar10-official --mode=sample

model_dir is a folder with config.json and diffusion_pytorch_model.safetensors, e.g. a download of
https://huggingface.co/google/ddpm-cifar10-32 (the official weights of Ho et al., ported by diffusers).
The imported weights become both the params and the EMA params of a step-0 checkpoint.
"""
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from diffusion_jax import checkpoints, experiment, workdir_lock
from diffusion_jax.checks import ConfigError, ProjectError
from diffusion_jax.models.convert import load_diffusers_unet
from diffusion_jax.train_state import TrainState

FLAGS = flags.FLAGS


def import_to_workdir(config: ml_collections.ConfigDict, model_dir: str, workdir: str) -> TrainState:
  """Writes a step-0 checkpoint of the diffusers model into a new workdir; config must describe the same model."""
  _, params, model_config, data_config = load_diffusers_unet(model_dir)
  imported = ml_collections.ConfigDict(config.to_dict())
  imported.model.update(model_config)
  imported.data.update(data_config)
  wanted, found = checkpoints.architecture(config), checkpoints.architecture(imported)
  differences = {k: (wanted[k], found[k]) for k in wanted if wanted[k] != found[k]}
  if differences:
    raise ConfigError(f'The config does not describe the model in {model_dir}; (config, checkpoint): {differences}.')
  exp = experiment.build(config)
  with workdir_lock.hold(workdir):  # A writer, like training.
    manager = checkpoints.manager(workdir)
    if manager.latest_step() is not None:
      raise ConfigError(f'{workdir} already holds checkpoints; import into a new workdir.')
    checkpoints.check_workdir_config(config, workdir)
    checkpoints.write_workdir_config(config, workdir)
    state = exp.state_from_params(params)
    checkpoints.save(manager, state)
    checkpoints.wait_until_finished(manager)
  logging.info('Imported %s into %s (step 0).', model_dir, workdir)
  return state


def main(argv):
  del argv
  try:
    import_to_workdir(FLAGS.config, FLAGS.model_dir, FLAGS.workdir)
  except ProjectError as e:
    sys.exit(f'import_diffusers: {e}')


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'The config file describing the same model.', lock_config=True)
  flags.DEFINE_string('model_dir', None, 'A diffusers UNet2DModel folder (config.json + .safetensors).')
  flags.DEFINE_string('workdir', None, 'A new workdir to write the checkpoint and config.json into.')
  flags.mark_flags_as_required(['config', 'model_dir', 'workdir'])
  app.run(main)
