"""One builder for every mode: a checked config -> model, optimizer, schedule, sampler, abstract state, samplers.

train, sample, compare, interpolate, eval, the diffusers importer, the benchmarks and the tests all start
from `build(config)`, so that they cannot disagree on how a config becomes a network or a state.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import datasets, diffusion, generation, optim, runtime, sampling, train_state
from diffusion_jax.checks import ConfigError, check_choice
from diffusion_jax.models.unet import DTYPES, check_unet_config, unet_from_config
from diffusion_jax.schedules import BETA_SCHEDULES, Schedule, schedule_from_config


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks the config before any data loading or compilation; raises a ConfigError naming the problem."""
  datasets.check_dataset_name(config.data.dataset)
  for kind, value, allowed in (('noise schedule', config.diffusion.schedule, tuple(BETA_SCHEDULES)),
                               ('parameterization', config.diffusion.parameterization, diffusion.PARAMETERIZATIONS),
                               ('loss type', config.diffusion.loss, diffusion.LOSS_TYPES),
                               ('loss weighting', config.diffusion.loss_weighting, diffusion.LOSS_WEIGHTINGS),
                               ('learning-rate decay', config.optim.lr_decay, optim.LR_DECAYS)):
    check_choice(kind, value, allowed)
  if not config.diffusion.snr_gamma > 0:
    raise ConfigError(f'diffusion.snr_gamma must be > 0 (min-SNR weighting clips the SNR at it; Hang et al. use 5), '
                      f'got {config.diffusion.snr_gamma!r}.')
  sampling.sampler_from_config(config).check(config.diffusion.num_timesteps)
  m = config.model
  check_unet_config(config.data.image_size, config.data.channels, m.ch, m.ch_mult, m.attn_resolutions,
                    m.num_groups, m.num_res_blocks)
  for name in ('training.batch_size', 'sampling.batch_size'):
    value = config[name.split('.')[0]][name.split('.')[1]]
    if value < 1 or value % num_devices:
      raise ConfigError(f'{name}={value} must be a positive multiple of the {num_devices} devices.')
  accum = config.training.grad_accum_steps
  if not isinstance(accum, int) or isinstance(accum, bool) or accum < 0 or (accum and config.training.batch_size % (accum * num_devices)):
    raise ConfigError(f'training.grad_accum_steps={accum!r} must be 0 (automatic) or a positive integer such that '
                      f'training.batch_size={config.training.batch_size} is a multiple of grad_accum_steps x the '
                      f'{num_devices} devices.')
  if not isinstance(m.num_classes, int) or m.num_classes < 0:
    raise ConfigError(f'model.num_classes must be 0 (unconditional) or the number of classes, got {m.num_classes!r}.')
  if not 0.0 <= m.label_dropout < 1.0:
    raise ConfigError(f'model.label_dropout must be in [0, 1), got {m.label_dropout!r}.')
  s = config.sampling
  if s.guidance_scale and not m.num_classes:
    raise ConfigError(f'sampling.guidance_scale={s.guidance_scale} needs a class-conditional model (model.num_classes '
                      f'> 0); this model is unconditional: set sampling.guidance_scale=0.')
  if s.guidance_scale < 0:
    raise ConfigError(f'sampling.guidance_scale must be >= 0, got {s.guidance_scale}.')
  if s.class_label != -1 and not (m.num_classes and 0 <= s.class_label < m.num_classes):
    raise ConfigError(f'sampling.class_label={s.class_label} is outside the classes [0, {m.num_classes}) of this '
                      f'model (-1: all classes in turn).')
  if m.dtype not in DTYPES:
    raise ConfigError(f'Unknown model.dtype {m.dtype!r}; choose one of {sorted(DTYPES)}.')


def init_params(model: nn.Module, data_config, rng: jax.Array):
  """The model's initial params for images of data_config's shape."""
  x = jnp.zeros((1, data_config.image_size, data_config.image_size, data_config.channels), jnp.float32)
  labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  return model.init({'params': rng}, x, jnp.zeros((1,), jnp.int32), labels, train=False)['params']


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a mode needs that follows from the config and the mesh; built once by `build`."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: Schedule
  sampler: sampling.Sampler  # config.sampling's.
  abstract_state: train_state.TrainState  # Shapes, dtypes and (replicated) shardings of the train state.
  grad_accum_steps: int  # Micro-batches per train step (config.training.grad_accum_steps; 0 -> 1).

  @property
  def abstract_params(self):
    return self.abstract_state.params

  @property
  def image_shape(self) -> tuple[int, int, int]:
    d = self.config.data
    return (d.image_size, d.image_size, d.channels)

  def init_state(self, rng: jax.Array) -> train_state.TrainState:
    """The step-0 train state drawn from rng, replicated over the mesh."""
    init = lambda key: train_state.create(init_params(self.model, self.config.data, key), self.tx)
    return jax.jit(init, out_shardings=NamedSharding(self.mesh, P()))(rng)

  def init_params(self, rng: jax.Array):
    """The initial params alone (for a forward or a sampler), replicated over the mesh."""
    return jax.jit(lambda key: init_params(self.model, self.config.data, key),
                   out_shardings=NamedSharding(self.mesh, P()))(rng)

  def state_from_params(self, params) -> train_state.TrainState:
    """A step-0 train state from given params (e.g. imported weights), replicated over the mesh."""
    params = jax.device_put(params, NamedSharding(self.mesh, P()))
    return jax.jit(lambda p: train_state.create(p, self.tx), out_shardings=NamedSharding(self.mesh, P()))(params)

  def sample_fn(self, sampler: sampling.Sampler | None = None, batch_size: int | None = None,
                record_every: int | None = None) -> generation.SampleFn:
    """generation.make_sample_fn for config.sampling (or another sampler, or batch size)."""
    s = self.config.sampling
    shape = (batch_size or s.batch_size, *self.image_shape)
    return generation.make_sample_fn(self.model, self.schedule, sampler or self.sampler, shape, self.mesh,
                                     record_every, s.guidance_scale, s.class_label)


def build(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Experiment:
  """Checks config (a ConfigError before any work) and builds the Experiment on mesh (default: all devices)."""
  mesh = mesh or runtime.create_mesh()
  check_config(config, mesh.size)
  model = unet_from_config(config.model)
  tx = optim.create_optimizer(config.optim, config.training.num_train_steps)
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(lambda key: train_state.create(init_params(model, config.data, key), tx),
                          jax.random.key(0))
  abstract_state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
  return Experiment(config=config, mesh=mesh, model=model, tx=tx, schedule=schedule_from_config(config.diffusion),
                    sampler=sampling.sampler_from_config(config), abstract_state=abstract_state,
                    grad_accum_steps=config.training.grad_accum_steps or 1)
