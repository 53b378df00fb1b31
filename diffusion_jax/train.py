"""Training: the data-parallel train step and the training loop (`train_and_evaluate`).

The train step is written per device (pmap style): each device computes the loss on its shard of the
global batch and the gradients are averaged with `lax.pmean` over the `batch` axis of a 1-D mesh of all
devices of all hosts, under `jax.shard_map` inside `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import os
import signal
from typing import Callable

from absl import logging
from clu import parameter_overview
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import (checkpoints, datasets, diffusion, experiment, files, generation, images, input_pipeline,
                           optim, perf, train_state, workdir_lock, writers)
from diffusion_jax.checks import ConfigError, NonFiniteLossError
from diffusion_jax.train_state import TrainState


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


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """train_step(state, batch, rng) -> (state, metrics), the state donated, for a batch made by `shard_batch`.

  One jitted program for the whole batch (num_micro_batches = 1). For k > 1 micro-batches, k calls of one
  jitted micro-step sum the gradients, then one jitted update applies them: a Python loop, as XLA:CPU runs a
  train step inside `lax.scan` many times slower; each program is the same on every call. `compile` gives
  the same step with its programs compiled ahead of time (jax.stages.Compiled in place of the jitted functions).
  """
  num_micro_batches: int
  whole: Callable | None  # (state, batch, rng) -> (state, metrics), when num_micro_batches == 1.
  micro: Callable | None  # (total, params, step, batch, rng, i) -> total + micro-batch i's (loss, grads) (device mean).
  update: Callable | None  # (state, total) -> (state, metrics): the mean over the micro-batches, applied.
  zeros: Callable | None  # params -> a zero total.

  def __call__(self, state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    if self.whole is not None:
      return self.whole(state, batch, rng)
    total = self.zeros(state.params)
    for micro in range(self.num_micro_batches):
      total = self.micro(total, state.params, state.step, batch, rng, jnp.int32(micro))
    return self.update(state, total)

  def compile(self, state: TrainState, batch: dict, rng: jax.Array) -> TrainStep:
    """This step with its programs compiled for arguments of the shapes, dtypes and shardings of these (arrays or
    jax.ShapeDtypeStructs, e.g. exp.abstract_state and `batch_spec(exp)`): compiled before the train state is
    allocated, the compiler's peak memory and the state's do not add up."""
    if self.whole is not None:
      return dataclasses.replace(self, whole=self.whole.lower(state, batch, rng).compile())
    zeros = self.zeros.lower(state.params).compile()
    total = zeros.out_info
    micro = self.micro.lower(total, state.params, state.step, batch, rng, jnp.int32(0)).compile()
    return dataclasses.replace(self, micro=micro, update=self.update.lower(state, total).compile(), zeros=zeros)

  def flops(self, num_devices: int) -> float:
    """FLOPs of one call over all devices, by XLA's cost analysis of the programs of a compiled step."""
    if not isinstance(self.whole or self.micro, jax.stages.Compiled):
      raise TypeError('TrainStep.flops needs a compiled step: call it on train_step.compile(...).')
    if self.whole is not None:
      return perf.cost_flops(self.whole) * num_devices
    return (perf.cost_flops(self.micro) * self.num_micro_batches + perf.cost_flops(self.update)) * num_devices


def make_train_step(exp: experiment.Experiment) -> TrainStep:
  """The train step of exp (see TrainStep) with k = exp.grad_accum_steps micro-batches.

  The timestep, noise and label dropout of each example derive from rng, the step and the example's
  index in the global batch; dropout masks from rng, the step, the micro-batch and the device. A resumed
  run therefore draws exactly the same numbers as an uninterrupted one, and without dropout k
  micro-batches give the update of the whole batch. Gradients are averaged over devices once per step.
  """
  config, model, schedule, k = exp.config, exp.model, exp.schedule, exp.grad_accum_steps
  num_classes = config.model.num_classes
  lr_schedule = optim.learning_rate_schedule(config.optim, config.training.num_train_steps)

  def loss_and_grads(params, batch: dict, rng: jax.Array, step: jax.Array, micro: jax.Array):
    """Per device: the mean loss over this device's examples of one micro-batch, and its gradients."""
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
                                        config.diffusion.loss, config.diffusion.loss_weighting,
                                        config.diffusion.snr_gamma)
      return losses.mean()

    # Differentiate with respect to per-device (varying) params: an invariant params' gradient would already be
    # summed over devices by shard_map's autodiff, and the pmean would then leave it num_devices times too large.
    return jax.value_and_grad(loss_fn)(jax.lax.pcast(params, 'batch', to='varying'))

  def apply_gradients(state: TrainState, loss: jax.Array, grads) -> tuple[TrainState, dict]:
    decay = optim.ema_decay(config.training, state.step)
    new_state = train_state.apply_update(state, grads, exp.tx, decay)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'param_norm': optax.tree.norm(new_state.params),
               'learning_rate': lr_schedule(state.step), 'ema_decay': decay}
    return new_state, metrics

  def whole(state, batch, rng):
    loss_grads = loss_and_grads(state.params, batch, rng, state.step, jnp.int32(0))
    return apply_gradients(state, *jax.lax.pmean(loss_grads, 'batch'))

  def micro(total, params, step, batch, rng, index):
    loss_grads = loss_and_grads(params, jax.tree.map(lambda x: x[index], batch), rng, step, index)
    return jax.tree.map(jnp.add, total, jax.lax.pmean(loss_grads, 'batch'))

  if k == 1:
    whole = jax.shard_map(whole, mesh=exp.mesh, in_specs=(P(), P('batch'), P()), out_specs=(P(), P()))
    return TrainStep(1, jax.jit(whole, donate_argnums=0), None, None, None)
  micro = jax.shard_map(micro, mesh=exp.mesh, in_specs=(P(), P(), P(), P(None, 'batch'), P(), P()), out_specs=P())
  update = lambda state, total: apply_gradients(state, *jax.tree.map(lambda x: x / k, total))
  # The sum starts at zero, so that every micro-step runs the same compiled program.
  zeros = lambda params: (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  return TrainStep(k, None, jax.jit(micro, donate_argnums=0), jax.jit(update, donate_argnums=0),
                   jax.jit(zeros, out_shardings=NamedSharding(exp.mesh, P())))


def shard_batch(local_batch: dict, mesh: Mesh, accum_steps: int = 1) -> dict:
  """Host-local numpy arrays (b, ...) -> global arrays for `train_step`, with each example's 'index' in the batch.

  Shapes: (B, ...) split over the `batch` axis, or (k, B/k, ...) split on axis 1 for k > 1
  gradient accumulation steps (micro-batch i holds rows [i b/k, (i+1) b/k) of every host).
  """
  b = len(local_batch['image'])
  local_batch = dict(local_batch, index=jax.process_index() * b + np.arange(b, dtype=np.int32))
  lead, sharding = batch_layout(mesh, b, accum_steps)
  return {k: jax.make_array_from_process_local_data(sharding, v.reshape(*lead, *v.shape[1:]))
          for k, v in local_batch.items()}


def batch_layout(mesh: Mesh, batch_size: int, accum_steps: int) -> tuple[tuple[int, ...], NamedSharding]:
  """The leading dims of a train step's batch arrays, (B,) or (k, B/k) for k > 1 micro-batches, and their
  sharding over the `batch` axis (axis 0, or axis 1 for micro-batches)."""
  if accum_steps == 1:
    return (batch_size,), NamedSharding(mesh, P('batch'))
  return (accum_steps, batch_size // accum_steps), NamedSharding(mesh, P(None, 'batch'))


def batch_spec(exp: experiment.Experiment) -> dict:
  """The global batch that `shard_batch` makes for exp's training batches, as jax.ShapeDtypeStructs."""
  lead, sharding = batch_layout(exp.mesh, exp.config.training.batch_size, exp.grad_accum_steps)
  return {'image': jax.ShapeDtypeStruct((*lead, *exp.image_shape), jnp.float32, sharding=sharding),
          **{name: jax.ShapeDtypeStruct(lead, jnp.int32, sharding=sharding) for name in ('label', 'index')}}


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
  samples = generation.generate(sample_fn, params, rng, config.sampling.num_samples, config.sampling.batch_size)
  if jax.process_index() == 0:
    grid = images.make_grid(*generation.grid_layout(samples, config))
    images.save_png(grid, os.path.join(workdir, 'samples', f'ema_step_{step}.png'))
    writer.write_images(step, {'ema_samples': grid[None]})


def make_meter(exp: experiment.Experiment, train_step: TrainStep) -> perf.Meter:
  """The speed meter of the run: the FLOPs per step of the compiled train_step and the peak of all its devices
  (training.peak_tflops > 0 sets one device's; else the table of perf.PEAK_TFLOPS, none on CPUs)."""
  device = exp.mesh.devices.flat[0]
  peak = perf.peak_flops(device.device_kind, exp.config.model.dtype, exp.config.training.peak_tflops)
  return perf.Meter(exp.config.training.batch_size, train_step.flops(exp.mesh.size), peak and peak * exp.mesh.size)


class Profile:
  """A profiler trace of the run's steps (start, start + num_steps] (the first, warming up, is left out) in workdir:
  jax.profiler's TensorBoard format (workdir/plugins/profile/RUN/*.xplane.pb), for TensorBoard's Profile tab."""

  def __init__(self, workdir: str, start_step: int, num_steps: int):
    self.workdir, self.first, self.last = workdir, start_step + 1, start_step + num_steps
    self.tracing = False

  def before(self, step: int) -> None:
    """Before the step that advances the state from `step`."""
    if step == self.first and self.last >= self.first:
      jax.profiler.start_trace(self.workdir)
      self.tracing = True

  def after(self, step: int, metrics) -> None:
    if self.tracing and step == self.last:
      jax.block_until_ready(metrics)
      self.stop()
      logging.info('Profiled steps %d to %d into %s/plugins/profile (tensorboard --logdir %s, Profile tab).',
                   self.first, self.last, self.workdir, self.workdir)

  def stop(self) -> None:
    if self.tracing:
      self.tracing = False
      jax.profiler.stop_trace()


def check_finite(metrics: dict, step: int, manager) -> dict:
  """Returns the metrics as floats; raises NonFiniteLossError (naming the step) if the loss is NaN or Inf."""
  if not np.isfinite(metrics['loss']):
    checkpoints.wait_until_finished(manager)
    last = manager.latest_step()
    where = (f'the last good checkpoint is at step {last} in {manager.directory}' if last is not None
             else 'no checkpoint has been written yet')
    raise NonFiniteLossError(f'The loss is {metrics["loss"]} at step {step}; stopping without saving it ({where}). '
                             'Lower optim.learning_rate or raise optim.warmup_steps, and train again.')
  return {k: float(v) for k, v in metrics.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from workdir's latest checkpoint) and writes logs, checkpoints and sample grids.

  Holds the workdir's lock (workdir_lock) while it runs; a workdir that cannot be written is a WorkdirError.
  """
  exp = experiment.build(config)  # Checks the config first.
  with workdir_lock.hold(workdir), files.write_errors(workdir):
    checkpoints.check_workdir_config(config, workdir)
    data = datasets.load_dataset(config.data)
    if config.model.num_classes and config.model.num_classes != data.num_classes:
      raise ConfigError(f'model.num_classes={config.model.num_classes} but dataset {data.name!r} has '
                        f'{data.num_classes or "no"} classes: set --config.model.num_classes={data.num_classes}.')
    return train(exp, data, workdir)


def train(exp: experiment.Experiment, data: datasets.Data, workdir: str) -> TrainState:
  """The training loop of train_and_evaluate, in a workdir it holds."""
  config = exp.config
  checkpoints.write_workdir_config(config, workdir)

  manager = checkpoints.manager(workdir, config.training.keep_checkpoints)
  train_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  train_step = make_train_step(exp).compile(exp.abstract_state, batch_spec(exp), train_rng)  # Before the state.
  if manager.latest_step() is not None:
    state = checkpoints.restore_train_state(manager, exp.abstract_state)
    logging.info('Resumed from the checkpoint at step %d.', int(state.step))
  else:
    state = exp.init_state(jax.random.fold_in(jax.random.key(config.seed), 0))
  start_step = int(state.step)

  writer = writers.create(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams(flatten(config.to_dict()))

  sample_fn = exp.sample_fn()
  batches = input_pipeline.create_iterator(data, config.training.batch_size, config.seed, start_step,
                                           config.data.random_flip, jax.process_index(), jax.process_count())
  num_steps = config.training.num_train_steps
  stop = StopSignal()
  logging.info('Training from step %d to %d on %d device(s); each step in %d micro-batch(es) of %d per device.',
               start_step, num_steps, exp.mesh.size, exp.grad_accum_steps,
               config.training.batch_size // exp.mesh.size // exp.grad_accum_steps)
  profile = Profile(workdir, start_step, config.training.profile_steps)
  meter = make_meter(exp, train_step)

  step = start_step
  try:
    while step < num_steps:
      batch = shard_batch(next(batches), exp.mesh, exp.grad_accum_steps)
      profile.before(step)
      state, metrics = train_step(state, batch, train_rng)
      step += 1
      profile.after(step, metrics)
      is_last = step == num_steps
      stopping = stop.requested(step)
      log = step % config.training.log_every_steps == 0 or is_last or stopping
      save = step % config.training.checkpoint_every_steps == 0 or is_last or stopping
      if log or save:
        logged = check_finite(jax.device_get(metrics), step, manager)
      if log:
        speed = meter.measure(step)
        writer.write_scalars(step, {**logged, **{f'perf/{k}': v for k, v in speed.items()}})
        if speed:
          logging.info('Step %d of %d: %.2f steps/s, %.0f images/s%s; about %.0f min to go.', step, num_steps,
                       speed['steps_per_sec'], speed['images_per_sec'],
                       f', MFU {100 * speed["mfu"]:.1f}%' if 'mfu' in speed else '',
                       (num_steps - step) / speed['steps_per_sec'] / 60)
      if save:
        checkpoints.save(manager, state)
      if stopping:
        break
      if step % config.training.sample_every_steps == 0 or is_last:
        write_sample_grid(writer, sample_fn, state.ema_params, config, workdir, step)
      if log or save or step in (start_step + 1, profile.last):  # Time only train steps: restart after other work
        # (compilation, checkpoints, sample grids, profiling).
        jax.block_until_ready(metrics)
        meter.start(step)
  except BaseException:
    try:  # The error under way is the one to report; a failing checkpoint write is only logged.
      checkpoints.wait_until_finished(manager)
    except Exception as e:  # pylint: disable=broad-except
      logging.error('%s', e)
    raise
  else:
    checkpoints.wait_until_finished(manager)
  finally:
    writer.flush()
    profile.stop()
    stop.restore()
  return state


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}, with sequences as strings (for hparams)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = str(v) if isinstance(v, (list, tuple)) or v is None else v
  return out
