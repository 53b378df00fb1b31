"""--mode=sample: samples from the workdir's latest checkpoint and writes a PNG grid and an npz."""
import os

from absl import logging
import jax
import ml_collections
import numpy as np

from diffusion_jax import images, sampling, train
from diffusion_jax.models.unet import unet_from_config
from diffusion_jax.schedules import schedule_from_config


def run_name(config) -> str:
  """A folder name that says how the samples were made, e.g. ddim50_eta0.0_uniform_ema_seed1."""
  s = config.sampling
  method = f'ddpm{config.diffusion.num_timesteps}_{s.variance}' if s.method == 'ddpm' else (
      f'ddim{s.num_steps}_eta{s.eta}_{s.spacing}')
  return f'{method}_{"ema" if s.use_ema else "raw"}_seed{s.seed}'


def sample_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes samples/<run_name>/{grid.png, samples.npz} (uint8 images, exactly num_samples); returns the folder."""
  mesh = train.create_mesh()
  train.check_config(config, mesh.size)
  num_samples = config.sampling.num_samples
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f'sampling.num_samples must be a positive integer, got {num_samples!r}.')
  manager = train.checkpoint_manager(workdir)
  if manager.latest_step() is None:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}: train first with --mode=train '
                            f'--workdir={workdir}.')
  train.check_workdir_config(config, workdir)
  model = unet_from_config(config.model)
  # The optimizer state is restored too (it is part of the state), so build the same optimizer.
  abstract = train.abstract_train_state(config, model, train.create_optimizer(config.optim), mesh)
  state = train.restore_state(manager, abstract)
  params = state.ema_params if config.sampling.use_ema else state.params

  d = config.data
  shape = (config.sampling.batch_size, d.image_size, d.image_size, d.channels)
  sample_fn = train.make_sample_fn(model, schedule_from_config(config.diffusion), sampling.sampler_from_config(config),
                                   shape, mesh)
  logging.info('Sampling %d images at step %d with %s.', num_samples, int(state.step), run_name(config))
  samples = train.generate(sample_fn, params, jax.random.key(config.sampling.seed), num_samples,
                           config.sampling.batch_size)
  out_dir = os.path.join(workdir, 'samples', run_name(config))
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(out_dir, 'samples.npz'), images=samples, step=int(state.step))
    images.save_png(images.make_grid(samples[:256]), os.path.join(out_dir, 'grid.png'))
    logging.info('Wrote %d samples to %s.', num_samples, out_dir)
  return out_dir
