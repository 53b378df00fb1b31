"""Training: train state with EMA params, a data-parallel train step, and the training loop.

The train step is written per device (pmap style): each device computes the loss on its
shard of the global batch and gradients are averaged with `lax.pmean` over the `batch`
axis of a 1-D mesh of all devices of all hosts, under `jax.shard_map` inside `jax.jit`.
"""
from __future__ import annotations

import functools
import gc
import json
import os
import signal
import time
from typing import Any, Callable

from absl import logging
from clu import parameter_overview
from etils import epy
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import diffusion, distributed, images, input_pipeline, sampling
from diffusion_jax.models.unet import DTYPES, check_unet_config, unet_from_config
from diffusion_jax.schedules import BETA_SCHEDULES, Schedule, schedule_from_config

# Loaded on first use, as a train step or a sampler needs neither: clu's writers load TensorFlow (0.6 GiB) when a
# run writes its first summary, orbax (25 MB) when it saves or restores a checkpoint.
with epy.lazy_imports():
  from clu import metric_writers, periodic_actions
  import orbax.checkpoint as ocp

# Config entries that fix the shapes and meaning of a checkpoint's parameters (dropout does not).
ARCHITECTURE_KEYS = ('model.ch', 'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions',
                     'model.resamp_with_conv', 'model.num_groups', 'data.image_size', 'data.channels',
                     'model.num_classes', 'diffusion.parameterization')
ADDED_ARCHITECTURE_KEYS = {'model.num_classes': 0}  # Added after the first release, with their earlier meaning.
# Examples per device in a micro-batch of the automatic gradient accumulation on CPUs: a CIFAR-10 train step at batch
# 128 takes 36 s as 8 micro-batches of 16 and 44 s whole (README "Benchmarks").
CPU_MICRO_BATCH = 16


class TrainState(flax.struct.PyTreeNode):
  """The step, the params and their EMA (trees of float32 arrays), and the optimizer's state for the params as
  one flat vector (`flat_vector`: Adam's moments are two float32 vectors of all the params' numbers).

  param_offsets, a tree like params of int32 scalars, says where each params leaf starts in such a vector.
  They are arrays, passed to the compiled step, not constants in it: XLA:CPU compiles one kernel for each
  distinct fusion, and constant offsets would make the copy of every leaf out of a vector a kernel of its own,
  while with offsets as arguments the leaves of one shape share one. Compiling a kernel costs ~1 MB of memory
  (README "Benchmarks").
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  param_offsets: Any


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf."""


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks the config before any data loading or compilation; raises a ValueError naming the problem."""
  input_pipeline.check_dataset_name(config.data.dataset)
  for kind, value, allowed in (('noise schedule', config.diffusion.schedule, tuple(BETA_SCHEDULES)),
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
  accum = config.training.grad_accum_steps
  if not isinstance(accum, int) or accum < 0 or (accum and config.training.batch_size % (accum * num_devices)):
    raise ValueError(f'training.grad_accum_steps={accum!r} must be 0 (automatic) or a positive integer such that '
                     f'training.batch_size={config.training.batch_size} is a multiple of grad_accum_steps x the '
                     f'{num_devices} devices.')
  if not isinstance(m.num_classes, int) or m.num_classes < 0:
    raise ValueError(f'model.num_classes must be 0 (unconditional) or the number of classes, got {m.num_classes!r}.')
  if not 0.0 <= m.label_dropout < 1.0:
    raise ValueError(f'model.label_dropout must be in [0, 1), got {m.label_dropout!r}.')
  s = config.sampling
  if s.guidance_scale and not m.num_classes:
    raise ValueError(f'sampling.guidance_scale={s.guidance_scale} needs a class-conditional model (model.num_classes '
                     f'> 0); this model is unconditional: set sampling.guidance_scale=0.')
  if s.guidance_scale < 0:
    raise ValueError(f'sampling.guidance_scale must be >= 0, got {s.guidance_scale}.')
  if s.class_label != -1 and not (m.num_classes and 0 <= s.class_label < m.num_classes):
    raise ValueError(f'sampling.class_label={s.class_label} is outside the classes [0, {m.num_classes}) of this model '
                     f'(-1: all classes in turn).')
  if m.dtype not in DTYPES:
    raise ValueError(f'Unknown model.dtype {m.dtype!r}; choose one of {sorted(DTYPES)}.')


def grad_accum_steps(training_config, mesh: Mesh) -> int:
  """Micro-batches per train step: training.grad_accum_steps, or for 0 (automatic) the following.

  On CPU devices, micro-batches of CPU_MICRO_BATCH examples per device when the per-device batch
  is a multiple of it above 2 x CPU_MICRO_BATCH (XLA:CPU trains fastest on small batches: the same
  update in less time and memory); otherwise, and always on GPUs and TPUs, the whole batch (1).
  """
  if training_config.grad_accum_steps:
    return training_config.grad_accum_steps
  per_device = training_config.batch_size // mesh.size
  if mesh.devices.flat[0].platform == 'cpu' and per_device > 2 * CPU_MICRO_BATCH and not per_device % CPU_MICRO_BATCH:
    return per_device // CPU_MICRO_BATCH
  return 1


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
  labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  params = model.init({'params': rng}, x, jnp.zeros((1,), jnp.int32), labels, train=False)['params']
  return train_state_from_params(params, tx)


def run_initializer(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh) -> Any:
  """init_fn(rng) (e.g. create_train_state) computed once and replicated over the mesh.

  Compiled for a single run (distributed.initializer_compiler_options); the compiled program and
  what compiling it freed are handed back before returning, so that they do not add to the memory of
  the next compilation (the train step's, ~0.1-0.2 GiB less).
  """
  # JAX caches a compiled program under the jitted function: a fresh lambda, not init_fn (which the caller
  # may keep), so that the program goes with it.
  init = jax.jit(lambda key: init_fn(key), out_shardings=NamedSharding(mesh, P()),  # pylint: disable=unnecessary-lambda
                 compiler_options=distributed.initializer_compiler_options())
  out = jax.block_until_ready(init(rng))
  del init
  gc.collect()  # The cache holds it in reference cycles until a collection.
  distributed.release_freed_memory()
  return out


def train_state_from_params(params, tx: optax.GradientTransformation) -> TrainState:
  """A step-0 state whose EMA params start as a copy (a separate buffer) of params."""
  leaves, treedef = jax.tree.flatten(params)
  starts = np.cumsum([0] + [x.size for x in leaves[:-1]])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(lambda p: p + 0.0, params), opt_state=tx.init(flat_vector(params)),
                    param_offsets=treedef.unflatten([jnp.asarray(start, jnp.int32) for start in starts]))


def flat_vector(tree) -> jax.Array:
  """The leaves of a tree of float32 arrays, raveled and concatenated in tree order: float32 (n,)."""
  return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def tree_from_flat(vector: jax.Array, offsets, like):
  """Inverse of `flat_vector`: the tree like `like` whose leaves are read from vector at offsets (see TrainState)."""
  return jax.tree.map(lambda x, start: jax.lax.dynamic_slice(vector, (start,), (x.size,)).reshape(x.shape),
                      like, offsets)


def apply_update(state: TrainState, grads, tx: optax.GradientTransformation, decay: jax.Array) -> TrainState:
  """The next state: one optimizer step for `grads` (a tree like the params) and the EMA with `decay` in [0, 1].

  The optimizer runs on flat vectors: a few kernels for all leaves, where per leaf XLA compiles several for each
  distinct leaf shape (see TrainState); only the params' and the EMA's updates are per leaf.
  """
  updates, opt_state = tx.update(flat_vector(grads), state.opt_state, flat_vector(state.params))
  params = optax.apply_updates(state.params, tree_from_flat(updates, state.param_offsets, state.params))
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)


def example_randomness(rng: jax.Array, index: jax.Array, num_timesteps: int, image_shape: tuple[int, ...],
                       label_dropout: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per example (b,) of a step's rng and its index in the global batch: timesteps int32 (b,) in [0, T),
  noise float32 (b, *image_shape) ~ N(0, I), and label dropout bool (b,) ~ Bernoulli(label_dropout)."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, index)
  t_keys, noise_keys, label_keys = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 3))(keys), 1, 0)
  t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_timesteps))(t_keys)
  noise = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(noise_keys)
  drop = jax.vmap(lambda k: jax.random.bernoulli(k, label_dropout))(label_keys)
  return t, noise, drop


def make_train_step(config, model: nn.Module, tx: optax.GradientTransformation, schedule: Schedule,
                    mesh: Mesh) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """Returns train_step(state, batch, rng) -> (state, metrics) for a batch made by `shard_batch`; donates the state.

  The timestep, noise and label dropout of each example derive from rng, the step and the
  example's index in the global batch; dropout masks from rng, the step, the micro-batch and
  the device. A resumed run therefore draws exactly the same numbers as an uninterrupted one,
  and without dropout gradient accumulation over k micro-batches equals one full batch.
  With k = grad_accum_steps(config.training, mesh) > 1 micro-batches, their gradients are summed
  by k runs of one compiled micro-step (a Python loop: a lax.scan is ~20x slower on CPU) and the
  optimizer, EMA and step advance once.
  """
  accum_steps = grad_accum_steps(config.training, mesh)
  num_classes = config.model.num_classes
  lr_schedule = learning_rate_schedule(config.optim)

  def loss_and_grads(params, batch: dict, rng: jax.Array, step: jax.Array, micro: int):
    """Per device: the batch-mean loss and gradients of this device's examples, averaged over devices."""
    x0 = batch['image']
    example_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, step))
    t, noise, drop = example_randomness(example_rng, batch['index'], schedule.num_timesteps, x0.shape[1:],
                                        config.model.label_dropout)
    # Classifier-free guidance training: dropped labels become the null label.
    labels = jnp.where(drop, num_classes, batch['label']) if num_classes else None
    dropout_rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, micro), jax.lax.axis_index('batch'))

    def loss_fn(params):
      model_fn = lambda x_t, t: model.apply({'params': params}, x_t, t, labels, train=True,
                                            rngs={'dropout': dropout_rng})
      losses = diffusion.diffusion_loss(schedule, model_fn, x0, t, noise, config.diffusion.parameterization,
                                        config.diffusion.loss)
      return losses.mean()

    # Differentiate with respect to per-device (varying) params: an invariant params' gradient would already be
    # summed over devices by shard_map's autodiff, and the pmean would then leave it num_devices times too large.
    params = jax.lax.pcast(params, 'batch', to='varying')
    return jax.lax.pmean(jax.value_and_grad(loss_fn)(params), 'batch')

  def apply_gradients(state: TrainState, loss: jax.Array, grads) -> tuple[TrainState, dict]:
    decay = ema_decay(config.training, state.step)
    new_state = apply_update(state, grads, tx, decay)
    metrics = {'loss': loss, 'grad_norm': jnp.linalg.norm(flat_vector(grads)),
               'param_norm': jnp.linalg.norm(flat_vector(new_state.params)), 'learning_rate': lr_schedule(state.step),
               'ema_decay': decay}
    return new_state, metrics

  if accum_steps == 1:
    def step_fn(state, batch, rng):
      return apply_gradients(state, *loss_and_grads(state.params, batch, rng, state.step, 0))
    step_fn = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P('batch'), P()), out_specs=(P(), P()))
    return jax.jit(step_fn, donate_argnums=0)

  def accumulate(total, params, step, batch, rng, micro):
    loss_grads = loss_and_grads(params, jax.tree.map(lambda x: x[micro], batch), rng, step, micro)
    return jax.tree.map(jnp.add, total, loss_grads)

  accumulate = jax.jit(jax.shard_map(accumulate, mesh=mesh, in_specs=(P(), P(), P(), P(None, 'batch'), P(), P()),
                                     out_specs=P()), donate_argnums=0)
  finish = jax.jit(lambda state, total: apply_gradients(state, *jax.tree.map(lambda x: x / accum_steps, total)),
                   donate_argnums=0)
  # The sum starts at zero, so that every micro-step runs the same compiled program.
  zeros = jax.jit(lambda params: (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params)),
                  out_shardings=NamedSharding(mesh, P()))

  def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    total = zeros(state.params)
    for micro in range(accum_steps):
      total = accumulate(total, state.params, state.step, batch, rng, micro)
    return finish(state, total)

  return train_step


def shard_batch(local_batch: dict, mesh: Mesh, accum_steps: int = 1) -> dict:
  """Host-local numpy arrays (b, ...) -> global arrays for `train_step`, with each example's 'index' in the batch.

  Shapes: (B, ...) split over the `batch` axis, or (k, B/k, ...) split on axis 1 for k > 1
  gradient accumulation steps (micro-batch i holds rows [i b/k, (i+1) b/k) of every host).
  """
  b = len(local_batch['image'])
  local_batch = dict(local_batch, index=jax.process_index() * b + np.arange(b, dtype=np.int32))
  if accum_steps == 1:
    sharding = NamedSharding(mesh, P('batch'))
  else:
    sharding = NamedSharding(mesh, P(None, 'batch'))
    local_batch = {k: v.reshape(accum_steps, b // accum_steps, *v.shape[1:]) for k, v in local_batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def sample_labels(first_index, batch_size: int, num_classes: int, class_label: int) -> jax.Array:
  """Class labels int32 (batch_size,) of samples first_index, first_index + 1, ...: class_label for all
  samples, or (class_label = -1) the classes in turn: sample i gets i mod num_classes."""
  if class_label >= 0:
    return jnp.full((batch_size,), class_label, jnp.int32)
  return (first_index + jnp.arange(batch_size, dtype=jnp.int32)) % num_classes


def make_sample_fn(model: nn.Module, schedule: Schedule, sampler: sampling.Sampler, shape: tuple[int, ...],
                   mesh: Mesh, record_every: int | None = None, guidance_scale: float = 0.0,
                   class_label: int = -1) -> Callable[[Any, jax.Array, int], jax.Array]:
  """Returns jitted sample_fn(params, rng, first_index) -> chain (F, *shape), the batch split over the mesh.

  A class-conditional model samples the labels of `sample_labels` for samples first_index, ...,
  with classifier-free guidance scale w = guidance_scale (0: conditional, no guidance).
  """
  batch_sharding = NamedSharding(mesh, P('batch'))

  @functools.partial(jax.jit, compiler_options=distributed.forward_compiler_options())
  def sample_fn(params, rng, first_index):
    def model_fn(x, t, labels=None):
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      return model.apply({'params': params}, x, t, labels, train=False)

    if model.num_classes:
      labels = sample_labels(first_index, shape[0], model.num_classes, class_label)
      if guidance_scale:
        model_fn = sampling.guided_model_fn(model_fn, labels, model.num_classes, guidance_scale)
      else:
        model_fn = functools.partial(model_fn, labels=labels)
    return sampling.sample(model_fn, schedule, sampler, rng, shape, record_every)

  return sample_fn


def sample_fn_from_config(config, model: nn.Module, mesh: Mesh, sampler: sampling.Sampler | None = None,
                          record_every: int | None = None) -> Callable[[Any, jax.Array, int], jax.Array]:
  """make_sample_fn for config.sampling (or another sampler) and the config's image shape."""
  d, s = config.data, config.sampling
  return make_sample_fn(model, schedule_from_config(config.diffusion), sampler or sampling.sampler_from_config(config),
                        (s.batch_size, d.image_size, d.image_size, d.channels), mesh, record_every,
                        s.guidance_scale, s.class_label)


def generate(sample_fn, params, rng: jax.Array, num_samples: int, batch_size: int, log_progress: bool = False,
             first_batch: np.ndarray | None = None) -> np.ndarray:
  """Runs sample_fn over ceil(num_samples / batch_size) batches; returns uint8 (num_samples, H, W, C).

  Batch i uses fold_in(rng, i), so the first images do not depend on num_samples. first_batch: batch 0
  already sampled (uint8, e.g. while recording its chain); sampling then starts at batch 1. With
  log_progress, logs images done, images/s and the estimated time left after every batch.
  """
  batches = [] if first_batch is None else [first_batch]
  num_batches, first = -(-num_samples // batch_size), len(batches)
  start = time.perf_counter()
  for i in range(first, num_batches):
    final = sample_fn(params, jax.random.fold_in(rng, i), i * batch_size)[-1]  # Split over all devices.
    batches.append(input_pipeline.to_uint8(multihost_utils.process_allgather(final, tiled=True)))
    if i == first:
      distributed.release_freed_memory()  # What compiling sample_fn (on the first call) freed.
    if log_progress:
      done, elapsed = min((i + 1) * batch_size, num_samples), time.perf_counter() - start
      sampled = done - first * batch_size  # By this call.
      logging.info('Sampled %d/%d images (%.2f images/s, %.0f s left).', done, num_samples, sampled / elapsed,
                   elapsed / sampled * (num_samples - done))
  return np.concatenate(batches)[:num_samples]


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
  elif jax.process_index() == 0:  # Written whole, then renamed: other processes never read half a file.
    os.makedirs(workdir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + '.tmp', path)


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
  """Samples config.sampling.num_samples images and writes them as samples/ema_step_{step}.png and to TensorBoard."""
  rng = jax.random.key(config.sampling.seed)
  samples = generate(sample_fn, params, rng, config.sampling.num_samples, config.sampling.batch_size)
  if jax.process_index() == 0:
    grid = images.make_grid(*grid_layout(samples, config))
    images.save_png(grid, os.path.join(workdir, 'samples', f'ema_step_{step}.png'))
    writer.write_images(step, {'ema_samples': grid[None]})


def grid_layout(samples: np.ndarray, config) -> tuple[np.ndarray, int | None]:
  """Samples (N, H, W, C) in grid order and the grid's columns (None: square).

  A conditional model that samples the classes in turn gets one row per class.
  """
  m, s = config.model, config.sampling
  if not (m.num_classes and s.class_label < 0 and len(samples) >= m.num_classes):
    return samples, None
  per_class = len(samples) // m.num_classes
  labels = np.arange(per_class * m.num_classes) % m.num_classes
  return samples[:len(labels)][np.argsort(labels, kind='stable')], per_class


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from workdir's latest checkpoint) and writes logs, checkpoints and sample grids."""
  mesh = create_mesh()
  check_config(config, mesh.size)
  check_workdir_config(config, workdir)
  data = input_pipeline.load_dataset(config.data)
  if config.model.num_classes and config.model.num_classes != data.num_classes:
    raise ValueError(f'model.num_classes={config.model.num_classes} but dataset {data.name!r} has '
                     f'{data.num_classes or "no"} classes: set --config.model.num_classes={data.num_classes}.')

  model = unet_from_config(config.model)
  tx = create_optimizer(config.optim)
  schedule = schedule_from_config(config.diffusion)

  manager = checkpoint_manager(workdir, config.training.keep_checkpoints)
  abstract_state = abstract_train_state(config, model, tx, mesh)
  if manager.latest_step() is not None:
    state = restore_state(manager, abstract_state)
    logging.info('Resumed from the checkpoint at step %d.', int(state.step))
  else:
    state = run_initializer(functools.partial(create_train_state, config, model, tx),
                            jax.random.fold_in(jax.random.key(config.seed), 0), mesh)
  start_step = int(state.step)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams({k: v for k, v in flatten(config.to_dict()).items()})

  train_step = make_train_step(config, model, tx, schedule, mesh)
  accum_steps = grad_accum_steps(config.training, mesh)
  sample_fn = sample_fn_from_config(config, model, mesh)
  batches = input_pipeline.create_iterator(data, config.training.batch_size, config.seed, start_step,
                                           config.data.random_flip, jax.process_index(), jax.process_count())
  train_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  num_steps = config.training.num_train_steps
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  stop = StopSignal()
  logging.info('Training from step %d to %d on %d device(s); each step in %d micro-batch(es) of %d per device.',
               start_step, num_steps, mesh.size, accum_steps, config.training.batch_size // mesh.size // accum_steps)

  step = start_step
  try:
    while step < num_steps:
      state, metrics = train_step(state, shard_batch(next(batches), mesh, accum_steps), train_rng)
      step += 1
      if step == start_step + 1:
        distributed.release_freed_memory()  # What compiling the train step (on the first call) freed.
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
