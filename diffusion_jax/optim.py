"""The optimizer of Ho et al. (Adam, linear warmup to a constant learning rate, global-norm clipping; optionally a
cosine decay to the end of the run) and the EMA decay of the parameters' moving average."""
import jax
import jax.numpy as jnp
import optax


LR_DECAYS = ('constant', 'cosine')


def learning_rate_schedule(optim_config, num_train_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to optim.learning_rate over optim.warmup_steps steps, then optim.lr_decay: constant
  (Ho et al.), or cosine from the peak to 0 at step num_train_steps (the run's end)."""
  warmup = max(optim_config.warmup_steps, 1)
  if optim_config.get('lr_decay', 'constant') == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, optim_config.learning_rate, warmup,
                                              max(num_train_steps, warmup + 1))
  return optax.linear_schedule(0.0, optim_config.learning_rate, warmup)


def create_optimizer(optim_config, num_train_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping to optim.grad_clip, then Adam with `learning_rate_schedule`."""
  return optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip),
      optax.adam(learning_rate_schedule(optim_config, num_train_steps), b1=optim_config.beta1,
                 b2=optim_config.beta2, eps=optim_config.eps))


def ema_decay(training_config, step: jax.Array) -> jax.Array:
  """The EMA decay in [0, 1) at `step`: training.ema_decay, with ema_warmup min(decay, (1 + step) / (10 + step))."""
  decay = jnp.asarray(training_config.ema_decay, jnp.float32)
  if training_config.ema_warmup:
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay
