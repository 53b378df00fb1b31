"""Negative log-likelihood in bits/dim from the variational bound, as Ho et al. 2020 (Sec. 3.3, Table 2).

For x_0 in [-1, 1] (uint8 pixels / 127.5 - 1) the bound is L = L_T + sum_{t=1}^{T-1} L_t + L_0 with, in the
code's 0-based timesteps t in [0, T):
  prior (L_T):  KL(q(x_{T-1} | x_0) || N(0, I));
  term t >= 1:  KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), x_t ~ q(x_t | x_0);
  term t = 0:   -log p(x_0 | x_1), a Gaussian discretized to the 256 pixel values.
p's mean is the posterior mean given the model's x_0 prediction (clipped to [-1, 1] with clip_x0, as Ho et
al.'s `calc_bpd_loop` by default) and its log variance is fixed ('fixedlarge' or 'fixedsmall', see
`model_log_variance`). Each term is averaged over the pixel dims and divided by ln 2: bits/dim. This follows
`GaussianDiffusion2` of Ho et al.'s diffusion_utils_2.py (`_vb_terms_bpd`, `_prior_bpd`, `calc_bpd_loop`).

model_fn(x_t, t) maps images (B, H, W, C) and int32 timesteps (B,) to an output of x_t's shape in the given
parameterization, as in `sampling.py`.
"""
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.checks import ConfigError, check_choice, check_concrete_range, check_positive_int
from diffusion_jax.diffusion import gather, q_posterior, q_sample
from diffusion_jax.images import pad_batch, to_float
from diffusion_jax.sampling import VARIANCES, predict_x0_eps
from diffusion_jax.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise in nats; the arguments broadcast.

  Ho et al.'s 0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)),
  written with expm1 so that nearly equal variances (e.g. the prior term) keep their precision in float32.
  """
  log_ratio = logvar1 - logvar2
  return 0.5 * (jnp.expm1(log_ratio) - log_ratio + (mean1 - mean2)**2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """Ho et al.'s approximation of the standard normal CDF: 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
  """log P(x) in nats of N(means, exp(log_scales)^2) discretized to the 256 pixel values; the arguments broadcast.

  x: pixel values k / 127.5 - 1, k in [0, 255]. Each value owns the bin x +- 1/255, the extreme bins reach
  -inf (x = -1) and +inf (x = 1), so the 256 probabilities sum to 1. Probabilities are floored at 1e-12.
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log = lambda p: jnp.log(jnp.maximum(p, 1e-12))
  return jnp.where(x < -0.999, log(cdf_plus), jnp.where(x > 0.999, log(1.0 - cdf_min), log(cdf_plus - cdf_min)))


def mean_bits(nats: jax.Array) -> jax.Array:
  """Elementwise nats (B, ...) -> bits/dim (B,): the mean over all but the batch axis, divided by ln 2."""
  return nats.reshape(nats.shape[0], -1).mean(axis=1) / np.log(2.0)


def check_images(x0: jax.Array) -> None:
  """Raises a ValueError unless x0 has a batch axis and (when concrete) lies in [-1, 1]."""
  if jnp.ndim(x0) < 2:
    raise ConfigError(f'x0 must have shape (B, H, W, C) or at least (B, D), got {jnp.shape(x0)}.')
  check_concrete_range('x0 (images scaled to [-1, 1])', x0, -1, 1, high_inclusive=True)


def model_log_variance(schedule: Schedule, t: jax.Array, ndim: int, variance: str) -> jax.Array:
  """log of p(x_{t-1} | x_t)'s fixed variance, shaped (B, 1, ..., 1) for t (B,) in [0, T).

  'fixedlarge': log beta_t, with beta_0 replaced by beta~_1 (a better decoder likelihood, as Ho et al.);
  'fixedsmall': log beta~_t, the posterior's, with beta~_0 (= 0) replaced by beta~_1.
  """
  check_choice('variance', variance, VARIANCES)
  log_var = schedule.posterior_log_variance_clipped
  if variance == 'fixedlarge':
    log_var = jnp.log(schedule.betas).at[0].set(log_var[0])
  return gather(log_var, t, ndim)


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
  """L_T in bits/dim (B,): KL(q(x_{T-1} | x_0) || N(0, I)) for x0 (B, ...) in [-1, 1]."""
  check_images(x0)
  alpha_bar = schedule.alphas_cumprod[-1]
  kl = normal_kl(jnp.sqrt(alpha_bar) * x0, jnp.log1p(-alpha_bar), 0.0, 0.0)
  return mean_bits(kl)


def vlb_term(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, *,
             variance: str = 'fixedlarge', parameterization: str = 'eps', clip_x0: bool = True) -> jax.Array:
  """Term t of the bound in bits/dim (B,) at x_t = q_sample(x0, t, noise): the decoder NLL where t = 0, else the KL.

  x0, noise: (B, H, W, C), x0 in [-1, 1] on the pixel grid; t: int32 (B,) in [0, T).
  """
  x_t = q_sample(schedule, x0, t, noise)
  x0_pred, _ = predict_x0_eps(schedule, x_t, t, model_fn(x_t, t), clip_x0=clip_x0,
                              parameterization=parameterization)
  true_mean, _, true_log_var = q_posterior(schedule, x0, x_t, t)
  model_mean, _, _ = q_posterior(schedule, x0_pred, x_t, t)
  log_var = model_log_variance(schedule, t, x0.ndim, variance)
  kl = mean_bits(normal_kl(true_mean, true_log_var, model_mean, log_var))
  decoder_nll = mean_bits(-discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var))
  return jnp.where(t == 0, decoder_nll, kl)


def vlb_terms(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, rng: jax.Array, variance: str = 'fixedlarge',
              parameterization: str = 'eps', clip_x0: bool = True) -> jax.Array:
  """All T terms of the bound in bits/dim, (B, T), column t = `vlb_term` at t (column 0: the decoder NLL).

  As Ho et al.'s `calc_bpd_loop`: each t draws its own x_t ~ q(x_t | x_0) (noise from split(rng, T)[t]) and calls
  the model once on the whole batch; the T calls run one after another in a `lax.map`.
  """
  check_images(x0)
  x0 = jnp.asarray(x0, jnp.float32)
  batch = x0.shape[0]

  def term(inputs):
    t, key = inputs
    noise = jax.random.normal(key, x0.shape, jnp.float32)
    return vlb_term(model_fn, schedule, x0, jnp.full((batch,), t, jnp.int32), noise, variance=variance,
                    parameterization=parameterization, clip_x0=clip_x0)

  timesteps = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
  return jax.lax.map(term, (timesteps, jax.random.split(rng, schedule.num_timesteps))).T


def bits_per_dim(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, rng: jax.Array, variance: str = 'fixedlarge',
                 parameterization: str = 'eps', clip_x0: bool = True) -> tuple[jax.Array, jax.Array]:
  """The bound on the NLL in bits/dim: (total (B,) = prior + the sum of the terms, terms (B, T) of `vlb_terms`)."""
  terms = vlb_terms(model_fn, schedule, x0, rng, variance, parameterization, clip_x0)
  return prior_bpd(schedule, x0) + terms.sum(axis=1), terms


def dataset_bits_per_dim(model_fn: ModelFn, schedule: Schedule, images: np.ndarray, batch_size: int,
                         rng: jax.Array, variance: str = 'fixedlarge', parameterization: str = 'eps',
                         clip_x0: bool = True) -> float:
  """The mean over uint8 images (N, H, W, C) of `bits_per_dim`'s total, e.g. Ho et al.'s 3.75 on CIFAR-10 test.

  Runs one jitted call (T model calls) per batch of batch_size images, batch i with key fold_in(rng, i); the last
  batch is padded by repeating its last image so that nothing recompiles. Logs progress after every batch.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim < 2 or len(images) == 0:
    raise ConfigError(f'images must be a non-empty uint8 array (N, H, W, C), got {images.dtype} {images.shape}.')
  check_positive_int('batch_size', batch_size)
  batch_size = min(batch_size, len(images))
  total_fn = jax.jit(lambda x0, key: bits_per_dim(model_fn, schedule, x0, key, variance, parameterization,
                                                  clip_x0)[0])
  total, done = 0.0, 0
  for i, start in enumerate(range(0, len(images), batch_size)):
    batch = images[start:start + batch_size]
    totals = total_fn(to_float(pad_batch(batch, batch_size)), jax.random.fold_in(rng, i))
    total += float(np.sum(np.asarray(totals)[:len(batch)], dtype=np.float64))
    done += len(batch)
    logging.info('NLL bound: %d/%d images, %.4f bits/dim so far.', done, len(images), total / done)
  return total / done
