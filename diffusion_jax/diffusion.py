"""The forward process, the posterior, output parameterizations and training losses.

Pure functions over arrays and a `Schedule`; images are (B, H, W, C) in [-1, 1] and
timesteps t are int32 arrays of shape (B,) with values in [0, T).
"""
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.checks import check_choice
from diffusion_jax.schedules import Schedule

PARAMETERIZATIONS = ('eps', 'x0', 'v')
LOSS_TYPES = ('mse', 'l1', 'huber')
LOSS_WEIGHTINGS = ('none', 'min_snr')


def expand_to(a: jax.Array, ndim: int) -> jax.Array:
  """a (B,) or () reshaped to (B, 1, ..., 1) to broadcast against arrays of rank `ndim`."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def gather(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] shaped (B, 1, ..., 1) to broadcast against arrays of rank `ndim`."""
  return expand_to(values[t], ndim)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I) with the given noise."""
  return (gather(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0 +
          gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array):
  """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
  mean = (gather(schedule.posterior_mean_coef1, t, x_t.ndim) * x0 +
          gather(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
  return (mean, gather(schedule.posterior_variance, t, x_t.ndim),
          gather(schedule.posterior_log_variance_clipped, t, x_t.ndim))


def x0_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  return ((x_t - gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * eps) /
          gather(schedule.sqrt_alphas_cumprod, t, x_t.ndim))


def eps_from_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  return ((x_t - gather(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x0) /
          gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim))


def v_from_x0_eps(schedule: Schedule, t: jax.Array, x0: jax.Array, eps: jax.Array) -> jax.Array:
  """The velocity v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (Salimans & Ho 2022)."""
  return (gather(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps -
          gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def x0_eps_from_output(schedule: Schedule, x_t: jax.Array, t: jax.Array, output: jax.Array,
                       parameterization: str) -> tuple[jax.Array, jax.Array]:
  """Converts a model output of the given parameterization into (x0, eps) predictions."""
  check_choice('parameterization', parameterization, PARAMETERIZATIONS)
  if parameterization == 'eps':
    return x0_from_eps(schedule, x_t, t, output), output
  if parameterization == 'x0':
    return output, eps_from_x0(schedule, x_t, t, output)
  sqrt_ab = gather(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
  sqrt_1m_ab = gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
  return sqrt_ab * x_t - sqrt_1m_ab * output, sqrt_1m_ab * x_t + sqrt_ab * output


def training_target(schedule: Schedule, t: jax.Array, x0: jax.Array, noise: jax.Array,
                    parameterization: str) -> jax.Array:
  """What the model should output for x_t = q_sample(x0, t, noise)."""
  check_choice('parameterization', parameterization, PARAMETERIZATIONS)
  if parameterization == 'eps':
    return noise
  if parameterization == 'x0':
    return x0
  return v_from_x0_eps(schedule, t, x0, noise)


def elementwise_loss(prediction: jax.Array, target: jax.Array, loss_type: str) -> jax.Array:
  """mse: squared error; l1: absolute error; huber: Huber with delta 1 (PyTorch's smooth L1)."""
  check_choice('loss type', loss_type, LOSS_TYPES)
  diff = prediction - target
  if loss_type == 'mse':
    return diff**2
  if loss_type == 'l1':
    return jnp.abs(diff)
  abs_diff = jnp.abs(diff)
  return jnp.where(abs_diff < 1.0, 0.5 * diff**2, abs_diff - 0.5)


def loss_weight(schedule: Schedule, t: jax.Array, parameterization: str, weighting: str = 'none',
                snr_gamma: float = 5.0) -> jax.Array:
  """Per-example loss weights (B,) for timesteps t (B,): 1 ('none'), or min-SNR-gamma (Hang et al. 2023).

  With SNR_t = ab_t / (1 - ab_t), min_snr weights the loss of each parameterization as the eps loss weighted by
  min(SNR, gamma): min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1) for v.
  """
  check_choice('loss weighting', weighting, LOSS_WEIGHTINGS)
  check_choice('parameterization', parameterization, PARAMETERIZATIONS)
  if weighting == 'none':
    return jnp.ones(t.shape, jnp.float32)
  snr = (schedule.sqrt_alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t]) ** 2  # No 1 - ab cancellation.
  clipped = jnp.minimum(snr, snr_gamma)
  return {'eps': clipped / snr, 'x0': clipped, 'v': clipped / (snr + 1.0)}[parameterization]


def diffusion_loss(schedule: Schedule, model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                   x0: jax.Array, t: jax.Array, noise: jax.Array, parameterization: str = 'eps',
                   loss_type: str = 'mse', weighting: str = 'none', snr_gamma: float = 5.0) -> jax.Array:
  """Per-example loss (B,), averaged over pixels and weighted by `loss_weight`: L_simple of Ho et al. for eps, mse
  and no weighting.

  model_fn(x_t, t) returns an output of x_t's shape in the given parameterization;
  t (B,) and noise (like x0) are drawn by the caller (uniform t, standard normal noise).
  """
  x_t = q_sample(schedule, x0, t, noise)
  target = training_target(schedule, t, x0, noise, parameterization)
  losses = elementwise_loss(model_fn(x_t, t), target, loss_type)
  return losses.reshape(losses.shape[0], -1).mean(axis=1) * loss_weight(schedule, t, parameterization, weighting,
                                                                         snr_gamma)
