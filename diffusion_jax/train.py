"""Training: train state with EMA params, a data-parallel train step, and the training loop.

The train step is written per device (pmap style): each device computes the loss on its
shard of the global batch and gradients are averaged with `lax.pmean` over the `batch`
axis of a 1-D mesh of all devices of all hosts, under `jax.shard_map` inside `jax.jit`.
"""
import functools
import json
import os
import signal
import time
from typing import Any, Callable

from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import diffusion, images, input_pipeline, sampling
from diffusion_jax.models.unet import check_unet_config, unet_from_config
from diffusion_jax.schedules import Schedule, schedule_from_config

# Config entries that fix the shapes and meaning of a checkpoint's parameters (dropout does not).
ARCHITECTURE_KEYS = ('model.ch', 'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions',
                     'model.resamp_with_conv', 'model.num_groups', 'data.image_size', 'data.channels',
                     'diffusion.parameterization')


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf."""


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks the config before any data loading or compilation; raises a ValueError naming the problem."""
  input_pipeline.check_dataset_name(config.data.dataset)
  for kind, value, allowed in (('noise schedule', config.diffusion.schedule, ('linear', 'cosine', 'quadratic', 'sigmoid')),
                               ('parameterization', config.diffusion.parameterization, diffusion.PARAMETERIZATIONS),
                               ('loss type', config.diffusion.loss, diffusion.LOSS_TYPES)):
    diffusion.check_choice(kind, value, allowed)
  sampling.sampler_from_config(config).check(config.diffusion.num_timesteps)
  m = config.model
  check_unet_config(config.data.image_size, config.data.channels, m.ch, m.ch_mult, m.attn_resolutions,
                    m.num_groups, m.num_res_blocks)
  for name in ('training.batch_size', 'sampling.batch_size'):
    value = config[name.split('.')[0]][name.split('.')[1]]
    if value < 1 or value % num_devices:
      raise ValueError(f'{name}={value} must be a positive multiple of the {num_devices} devices.')


def create_mesh() -> Mesh:
  """A 1-D mesh named `batch` over all devices of all hosts."""
  return Mesh(np.asarray(jax.devices()), ('batch',))


def create_optimizer(optim_config) -> optax.GradientTransformation:
  """Adam with linear warmup to a constant learning rate and global-norm clipping (Ho et al.)."""
  return optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip),
      optax.adam(learning_rate_schedule(optim_config), b1=optim_config.beta1, b2=optim_config.beta2,
                 eps=optim_config.eps))


def learning_rate_schedule(optim_config) -> optax.Schedule:
  return optax.linear_schedule(0.0, optim_config.learning_rate, max(optim_config.warmup_steps, 1))


def ema_decay(training_config, step: jax.Array) -> jax.Array:
  """The EMA decay at `step`, optionally warmed up as min(decay, (1 + step) / (10 + step))."""
  decay = jnp.asarray(training_config.ema_decay, jnp.float32)
  if training_config.ema_warmup:
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def create_train_state(config, model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """Initial state; the EMA params start as a copy (a separate buffer) of the params."""
  d = config.data
  x = jnp.zeros((1, d.image_size, d.image_size, d.channels), jnp.float32)
  params = model.init({'params': rng}, x, jnp.zeros((1,), jnp.int32), train=False)['params']
  return train_state_from_params(params, tx)


def train_state_from_params(params, tx: optax.GradientTransformation) -> TrainState:
  """A step-0 state whose EMA params start as a copy (a separate buffer) of params."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(lambda p: p + 0.0, params), opt_state=tx.init(params))


def make_train_step(config, model: nn.Module, tx: optax.GradientTransformation, schedule: Schedule,
                    mesh: Mesh) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """Returns jitted train_step(state, batch, rng) -> (state, metrics); the state is donated.

  The timestep and noise of each example derive from rng, the step and the example's index
  in the global batch; dropout masks from rng, the step and the device index. A resumed
  run therefore draws exactly the same numbers as an uninterrupted one.
  """
  lr_schedule = learning_rate_schedule(config.optim)
  num_timesteps = schedule.num_timesteps

  def per_device_step(state: TrainState, batch: dict, rng: jax.Array):
    x0 = batch['image']
    local = x0.shape[0]
    device = jax.lax.axis_index('batch')
    example_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    example_keys = jax.vmap(jax.random.fold_in, (None, 0))(example_rng, device * local + jnp.arange(local))
    t_keys, noise_keys = jnp.moveaxis(jax.vmap(jax.random.split)(example_keys), 1, 0)
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_timesteps))(t_keys)
    noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(noise_keys)
    dropout_rng = jax.random.fold_in(dropout_rng, device)

    def loss_fn(params):
      model_fn = lambda x_t, t: model.apply({'params': params}, x_t, t, train=True, rngs={'dropout': dropout_rng})
      losses = diffusion.diffusion_loss(schedule, model_fn, x0, t, noise, config.diffusion.parameterization,
                                        config.diffusion.loss)
      return losses.mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    loss, grads = jax.lax.pmean((loss, grads), 'batch')
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(config.training, state.step)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'param_norm': optax.tree.norm(params),
               'learning_rate': lr_schedule(state.step), 'ema_decay': decay}
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
    return new_state, metrics

  step = jax.shard_map(per_device_step, mesh=mesh, in_specs=(P(), P('batch'), P()), out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=0)


def make_sample_fn(model: nn.Module, schedule: Schedule, sampler: sampling.Sampler, shape: tuple[int, ...],
                   mesh: Mesh, record_every: int | None = None) -> Callable[[Any, jax.Array], jax.Array]:
  """Returns jitted sample_fn(params, rng) -> chain (F, *shape), with the batch split over the mesh."""
  batch_sharding = NamedSharding(mesh, P('batch'))

  @jax.jit
  def sample_fn(params, rng):
    def model_fn(x, t):
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      return model.apply({'params': params}, x, t, train=False)
    return sampling.sample(model_fn, schedule, sampler, rng, shape, record_every)

  return sample_fn


def generate(sample_fn, params, rng: jax.Array, num_samples: int, batch_size: int) -> np.ndarray:
  """Runs sample_fn over ceil(num_samples / batch_size) batches; returns uint8 (num_samples, H, W, C)."""
  batches = []
  for i in range(-(-num_samples // batch_size)):
    final = sample_fn(params, jax.random.fold_in(rng, i))[-1]  # Split over the devices of all hosts.
    batches.append(input_pipeline.to_uint8(multihost_utils.process_allgather(final, tiled=True)))
  return np.concatenate(batches)[:num_samples]


def architecture(config) -> dict:
  """The config entries that must match between a checkpoint and the config restoring it."""
  flat = {}
  for key in ARCHITECTURE_KEYS:
    node = config
    for part in key.split('.'):
      node = node[part]
    flat[key] = node
  return json.loads(json.dumps(flat))  # Tuples become lists, as in the saved JSON.


def check_workdir_config(config, workdir: str) -> None:
  """Saves config.json in a new workdir; refuses a workdir whose saved architecture differs."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      saved = ml_collections.ConfigDict(json.load(f))
    old, new = architecture(saved), architecture(config)
    diffs = [f'{k}: checkpoint {old[k]} vs config {new[k]}' for k in new if old.get(k) != new[k]]
    if diffs:
      raise ValueError(f'The workdir {workdir} holds a run of another architecture; use a new --workdir or the '
                       f'same settings. Differences: ' + '; '.join(diffs))
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def checkpoint_manager(workdir: str, keep: int = 2, save_interval_steps: int = 1) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_interval_steps, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options)


def restore_state(manager: ocp.CheckpointManager, abstract_state: TrainState, step: int | None = None) -> TrainState:
  """Restores the checkpoint at `step` (default: latest) into the shardings of abstract_state."""
  step = manager.latest_step() if step is None else step
  if step not in manager.all_steps():
    raise ValueError(f'No checkpoint at step {step} in {manager.directory}; available: {manager.all_steps()}.')
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # Orbax raises several types for corrupt or mismatched files.
    raise ValueError(f'Cannot restore the checkpoint at step {step} in {manager.directory}: {e}') from e


def abstract_train_state(config, model, tx, mesh: Mesh) -> TrainState:
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(functools.partial(create_train_state, config, model, tx), jax.random.key(0))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


class StopSignal:
  """Preemption and interruption: the training loop asks `requested(step)` after every step.

  One process: SIGTERM (preemption, kill) and the first Ctrl-C set a flag (a second Ctrl-C
  interrupts at once). Several processes: JAX's preemption sync point, so that all processes
  agree on the step at which to save and stop.
  """

  def __init__(self):
    self.multiprocess = jax.process_count() > 1
    self.received = False
    if not self.multiprocess:
      signal.signal(signal.SIGTERM, self._handle)
      signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning('Received signal %d: saving a checkpoint and stopping (Ctrl-C again to abort).', signum)
    self.received = True
    signal.signal(signal.SIGINT, signal.default_int_handler)

  def requested(self, step: int) -> bool:
    if self.multiprocess:
      self.received = self.received or multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def restore(self):
    if not self.multiprocess:
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      signal.signal(signal.SIGINT, signal.default_int_handler)


def write_sample_grid(writer, sample_fn, params, config, workdir: str, step: int) -> None:
  rng = jax.random.key(config.sampling.seed)
  samples = generate(sample_fn, params, rng, config.sampling.num_samples, config.sampling.batch_size)
  if jax.process_index() == 0:
    grid = images.make_grid(samples)
    images.save_png(grid, os.path.join(workdir, 'samples', f'ema_step_{step}.png'))
    writer.write_images(step, {'ema_samples': grid[None]})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from workdir's latest checkpoint) and writes logs, checkpoints and sample grids."""
  mesh = create_mesh()
  check_config(config, mesh.size)
  check_workdir_config(config, workdir)
  data = input_pipeline.load_dataset(config.data)

  model = unet_from_config(config.model)
  tx = create_optimizer(config.optim)
  schedule = schedule_from_config(config.diffusion)
  sampler = sampling.sampler_from_config(config)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('batch'))

  manager = checkpoint_manager(workdir, config.training.keep_checkpoints)
  abstract_state = abstract_train_state(config, model, tx, mesh)
  if manager.latest_step() is not None:
    state = restore_state(manager, abstract_state)
    logging.info('Resumed from the checkpoint at step %d.', int(state.step))
  else:
    init = jax.jit(functools.partial(create_train_state, config, model, tx), out_shardings=replicated)
    state = init(jax.random.fold_in(jax.random.key(config.seed), 0))
  start_step = int(state.step)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams({k: v for k, v in flatten(config.to_dict()).items()})

  train_step = make_train_step(config, model, tx, schedule, mesh)
  sample_shape = (config.sampling.batch_size, config.data.image_size, config.data.image_size, config.data.channels)
  sample_fn = make_sample_fn(model, schedule, sampler, sample_shape, mesh)
  batches = input_pipeline.create_iterator(data, config.training.batch_size, config.seed, start_step,
                                           config.data.random_flip, jax.process_index(), jax.process_count())
  train_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  num_steps = config.training.num_train_steps
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  stop = StopSignal()
  logging.info('Training from step %d to %d on %d device(s).', start_step, num_steps, mesh.size)

  step = start_step
  try:
    while step < num_steps:
      local = next(batches)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
      state, metrics = train_step(state, batch, train_rng)
      step += 1
      report(step)
      is_last = step == num_steps
      stopping = stop.requested(step)
      log = step % config.training.log_every_steps == 0 or is_last or stopping
      save = step % config.training.checkpoint_every_steps == 0 or is_last or stopping
      if log or save:
        logged = check_finite(jax.device_get(metrics), step, manager)
      if log:
        writer.write_scalars(step, logged)
      if save:
        manager.save(step, args=ocp.args.StandardSave(state))
      if stopping:
        break
      if step % config.training.sample_every_steps == 0 or is_last:
        write_sample_grid(writer, sample_fn, state.ema_params, config, workdir, step)
  finally:
    manager.wait_until_finished()
    writer.flush()
    stop.restore()
  return state


def check_finite(metrics: dict, step: int, manager: ocp.CheckpointManager) -> dict:
  """Returns the metrics as floats; raises NonFiniteLossError (naming the step) if the loss is NaN or Inf."""
  if not np.isfinite(metrics['loss']):
    manager.wait_until_finished()
    raise NonFiniteLossError(f'The loss is {metrics["loss"]} at step {step}; stopping without saving it. The last '
                             f'good checkpoint is at step {manager.latest_step()} in {manager.directory}.')
  return {k: float(v) for k, v in metrics.items()}


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}, with sequences as strings (for hparams)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = str(v) if isinstance(v, (list, tuple)) or v is None else v
  return out
