"""--mode=sample and --mode=compare: pictures and sample files from a workdir's checkpoint.

sample:  samples/<run name>/ grid.png, samples.npz (uint8 images, exactly num_samples, and labels),
         optionally images/00000.png ..., and the denoising chain as chain.png (strip) and chain.gif.
compare: samples/compare_seed<seed>_step<step>.png: the same noise through DDPM, and DDIM, Karras's Heun and
         Euler-ancestral at each of several model-call budgets, with EMA and raw weights, one labelled row each
         (with its steps, model calls and time).
interpolate: samples/interpolate_step<step>/: two images encoded into x_T by DDIM inversion, spherical
         interpolation between the two x_T decoded by DDIM (interpolation.png strip and .gif), and the
         reconstruction error of the inversion at several step counts (reconstruction.json).
"""
import functools
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from PIL import Image

from diffusion_jax import checkpoints, datasets, experiment, files, generation, images, karras, runtime, sampling
from diffusion_jax.checks import ConfigError, MissingFileError, check_positive_int


def restore(config: ml_collections.ConfigDict, workdir: str, use_ema: bool | None = None):
  """(experiment, params, step): the Experiment of config and the params (EMA by default: sampling.use_ema) of
  checkpoint sampling.checkpoint_step (-1: the latest) of workdir, without the optimizer state."""
  exp = experiment.build(config)
  check_positive_int('sampling.num_samples', config.sampling.num_samples)
  manager = checkpoints.manager(workdir, read_only=True)
  if manager.latest_step() is None:
    raise MissingFileError(f'No checkpoint in {manager.directory}: train first with --mode=train '
                           f'--workdir={workdir}.')
  step = config.sampling.checkpoint_step
  if step != -1 and step not in manager.all_steps():
    raise ConfigError(f'No checkpoint at step {step} in {manager.directory}; available steps: {manager.all_steps()} '
                      f'(set --config.sampling.checkpoint_step to one of them, or -1 for the latest).')
  checkpoints.check_workdir_config(config, workdir)
  use_ema = config.sampling.use_ema if use_ema is None else use_ema
  params, step = checkpoints.restore_params(manager, exp.abstract_params, None if step == -1 else step, use_ema)
  return exp, params, step


def run_name(config) -> str:
  """A folder name that says how the samples were made, e.g. ddim50_eta0.0_uniform_ema_seed1_step2500."""
  s = config.sampling
  if s.method == 'ddpm':
    method = f'ddpm{config.diffusion.num_timesteps}_{s.variance}'
  elif s.method == 'ddim':
    method = f'ddim{s.num_steps}_eta{s.eta}_{s.spacing}'
  elif s.method in karras.METHODS:  # e.g. heun10_karras_rho7.0, euler_a20_eta1.0_noise1.0_karras_rho7.0
    method = s.method + str(s.num_steps) + (f'_eta{s.eta}_noise{s.s_noise}' if s.method == 'euler_a' else '')
    method += f'_churn{s.s_churn}_tmin{s.s_tmin}_tmax{s.s_tmax}_noise{s.s_noise}' if s.s_churn else ''
    method += f'_{s.sigma_schedule}_rho{s.rho}'
  else:
    method = f'{s.method}_{s.num_steps}_{s.spacing}'
  if config.model.num_classes:
    method += f'_w{s.guidance_scale}' + (f'_class{s.class_label}' if s.class_label >= 0 else '')
  return f'{method}_{"ema" if s.use_ema else "raw"}_seed{s.seed}'


def sample_labels(config, num_samples: int) -> np.ndarray | None:
  """The class label of each of num_samples samples (None for an unconditional model), as sample_fn draws them."""
  labels = generation.sample_labels(0, num_samples, config.model.num_classes, config.sampling.class_label)
  return None if labels is None else np.asarray(labels)


def sample_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes samples/<run name>_step<step>/ (see the module docstring); returns the folder."""
  s = config.sampling
  check_positive_int('sampling.chain_frames', s.chain_frames)
  exp, params, step = restore(config, workdir)
  logging.info('Sampling %d images at step %d with %s.', s.num_samples, step, run_name(config))
  rng = jax.random.key(s.seed)
  first_batch = chain = None
  if s.chain_images:  # The first batch records its chain; its last frame is that batch of the samples.
    num_steps = exp.sampler.steps(config.diffusion.num_timesteps)
    chain_fn = exp.sample_fn(record_every=max(1, num_steps // s.chain_frames))
    frames = images.to_uint8(multihost_utils.process_allgather(chain_fn(params, jax.random.fold_in(rng, 0), 0),
                                                               tiled=True))
    first_batch, chain = frames[-1], frames[:, :s.chain_images]
  samples = generation.generate(exp.sample_fn(), params, rng, s.num_samples, s.batch_size, log_progress=True,
                                first_batch=first_batch)

  out_dir = os.path.join(workdir, 'samples', f'{run_name(config)}_step{step}')
  if jax.process_index() == 0:
    labels = sample_labels(config, s.num_samples)
    extra = {} if labels is None else {'labels': labels}
    with files.atomic_write(os.path.join(out_dir, 'samples.npz')) as f:
      np.savez_compressed(f, images=samples, step=step, **extra)
    images.save_png(images.make_grid(*generation.grid_layout(samples[:256], config)),
                    os.path.join(out_dir, 'grid.png'))
    if s.save_individual:
      for i, image in enumerate(samples):
        images.save_png(image, os.path.join(out_dir, 'images', f'{i:05d}.png'))
    if chain is not None:
      images.save_png(images.chain_strip(chain), os.path.join(out_dir, 'chain.png'))
      images.save_gif(np.stack([images.make_grid(frame) for frame in chain]), os.path.join(out_dir, 'chain.gif'))
    logging.info('Wrote %d samples to %s.', s.num_samples, out_dir)
  return out_dir


COMPARE_NAMES = {'ddpm': 'DDPM', 'ddim': 'DDIM', 'heun': 'Heun', 'euler_a': 'Euler-a'}


def compare_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the DDPM vs DDIM vs Heun vs Euler-a, EMA vs raw comparison picture (module docstring); returns its path."""
  s = config.sampling
  exp, ema_params, step = restore(config, workdir, use_ema=True)
  raw_params, _ = checkpoints.restore_params(checkpoints.manager(workdir, read_only=True), exp.abstract_params,
                                             step, use_ema=False)
  n = s.compare_images
  check_positive_int('sampling.compare_images', n)
  if n % exp.mesh.size:
    raise ConfigError(f'sampling.compare_images={n} must be a multiple of the {exp.mesh.size} devices.')
  T = config.diffusion.num_timesteps
  parameterization = config.diffusion.parameterization
  samplers = [sampling.Sampler('ddpm', T, variance=s.variance, parameterization=parameterization)]
  for k in s.compare_steps:  # Each at k model calls (Heun at 2 n - 1 <= k, n >= 1 noise levels).
    samplers += [sampling.Sampler('ddim', k, eta=0.0, spacing=s.spacing, parameterization=parameterization),
                 sampling.Sampler('heun', max(1, (k + 1) // 2), rho=s.rho, parameterization=parameterization),
                 sampling.Sampler('euler_a', k, eta=1.0, rho=s.rho, parameterization=parameterization)]
  rows, labels = [], []
  for use_ema, params in ((True, ema_params), (False, raw_params)):
    for sampler in samplers:
      sample_fn = exp.sample_fn(sampler, batch_size=n)
      sample_fn(params, jax.random.key(s.seed), 0).block_until_ready()  # Compile.
      start = time.perf_counter()
      row = generation.generate(sample_fn, params, jax.random.key(s.seed), n, n)
      seconds = time.perf_counter() - start
      calls = sampler.model_calls(T)
      name = f'{COMPARE_NAMES[sampler.method]}-{sampler.steps(T)} ({calls} call{"s" * (calls != 1)})'
      labels.append(f'{name} {"EMA" if use_ema else "raw"}  {seconds:.1f} s')
      rows.append(images.make_grid(row, n))
      logging.info('%s (%d images).', labels[-1], n)
  path = os.path.join(workdir, 'samples', f'compare_seed{s.seed}_step{step}.png')
  if jax.process_index() == 0:
    images.save_png(images.labelled_rows(rows, labels), path)
    logging.info('Wrote %s.', path)
  return path


def interpolation_pair(config) -> np.ndarray:
  """uint8 (2, H, W, C): the files sampling.interpolate_files, or the first and the middle training image."""
  d, files = config.data, config.sampling.interpolate_files
  if not files:
    data = datasets.load_dataset(config.data)
    return datasets.read_images(data, np.array([0, len(data) // 2]))
  if len(files) != 2:
    raise ConfigError(f'sampling.interpolate_files must name two images, got {len(files)}: {files}.')
  pictures = []
  for path in files:
    if not os.path.isfile(path):
      raise MissingFileError(f'Interpolation image {path} does not exist.')
    pictures.append(Image.open(path))
  if pictures[0].size != pictures[1].size:
    raise ConfigError(f'Cannot interpolate between images of different sizes: {files[0]} is {pictures[0].size[0]}x'
                      f'{pictures[0].size[1]} and {files[1]} is {pictures[1].size[0]}x{pictures[1].size[1]}.')
  return np.stack([datasets.fit_image(p, d.image_size, d.channels) for p in pictures])


def interpolate_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """DDIM inversion, reconstruction and interpolation of two images (see the module docstring); returns the folder."""
  s = config.sampling
  check_positive_int('sampling.interpolate_frames', s.interpolate_frames)
  pair = interpolation_pair(config)
  exp, params, step = restore(config, workdir)
  model, schedule = exp.model, exp.schedule
  x0 = jnp.asarray(images.to_float(pair))

  def model_fn(x, t):  # A conditional model is inverted with the null label (unconditional).
    labels = jnp.full(x.shape[:1], model.num_classes, jnp.int32) if model.num_classes else None
    return model.apply({'params': params}, x, t, labels, train=False)

  def ddim(num_steps: int) -> sampling.Sampler:
    return sampling.Sampler('ddim', num_steps, eta=0.0, spacing=s.spacing, clip_x0=False,
                            parameterization=config.diffusion.parameterization)

  @functools.partial(jax.jit, static_argnums=0, compiler_options=runtime.inference_compiler_options())
  def encode(sampler, x):
    return sampling.ddim_invert(model_fn, schedule, sampler, x)

  @functools.partial(jax.jit, static_argnums=0, compiler_options=runtime.inference_compiler_options())
  def decode(sampler, x_T):
    return sampling.sample(model_fn, schedule, sampler, jax.random.key(s.seed), x_T.shape, x_T=x_T)[-1]

  reconstruction_mse = {}
  for num_steps in sorted(set(s.compare_steps) | {s.interpolate_steps}):
    sampler = ddim(num_steps)
    error = float(jnp.mean((decode(sampler, encode(sampler, x0)) - x0) ** 2))
    reconstruction_mse[num_steps] = error
    logging.info('DDIM-%d inversion: reconstruction MSE %.6f (images in [-1, 1]).', num_steps, error)
  sampler = ddim(s.interpolate_steps)
  x_T = encode(sampler, x0)
  path = sampling.slerp(x_T[0], x_T[1], np.linspace(0.0, 1.0, s.interpolate_frames))
  frames = images.to_uint8(decode(sampler, path))

  out_dir = os.path.join(workdir, 'samples', f'interpolate_step{step}')
  if jax.process_index() == 0:
    strip = np.concatenate([pair[:1], frames, pair[1:]])
    images.save_png(images.make_grid(strip, len(strip)), os.path.join(out_dir, 'interpolation.png'))
    images.save_gif(np.concatenate([frames, frames[-2:0:-1]]), os.path.join(out_dir, 'interpolation.gif'),
                    hold_last=1)  # There and back.
    files.write_text(os.path.join(out_dir, 'reconstruction.json'), json.dumps(
        {'step': step, 'reconstruction_mse_by_ddim_steps': reconstruction_mse,
         'images': list(s.interpolate_files) or 'the first and the middle training image'}, indent=2))
    logging.info('Wrote %s.', out_dir)
  return out_dir

