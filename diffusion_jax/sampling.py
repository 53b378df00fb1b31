"""DDPM and DDIM samplers: single update steps and one compiled sampling loop.

model_fn(x_t, t) maps images (B, H, W, C) and int32 timesteps (B,) to an output of
x_t's shape in the sampler's parameterization. The loop runs inside `lax.scan`, so a
jitted call to `sample` is one dispatch for the whole chain.
"""
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import (PARAMETERIZATIONS, check_choice, eps_from_x0, expand_to, gather, q_posterior,
                                     x0_eps_from_output)
from diffusion_jax.schedules import Schedule

METHODS = ('ddpm', 'ddim')
SPACINGS = ('uniform', 'quadratic', 'trailing')
VARIANCES = ('fixedlarge', 'fixedsmall')


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How to sample. num_steps, eta and spacing are used by DDIM; DDPM runs all T steps."""
  method: str = 'ddim'
  num_steps: int = 50
  eta: float = 0.0
  spacing: str = 'uniform'
  variance: str = 'fixedlarge'  # DDPM only: beta_t ('fixedlarge') or the posterior variance.
  clip_x0: bool = True
  parameterization: str = 'eps'

  def check(self, num_timesteps: int) -> None:
    """Raises a ValueError naming the first setting that is invalid for T = num_timesteps."""
    check_choice('sampler', self.method, METHODS)
    check_choice('step spacing', self.spacing, SPACINGS)
    check_choice('DDPM variance', self.variance, VARIANCES)
    check_choice('parameterization', self.parameterization, PARAMETERIZATIONS)
    if self.method == 'ddpm' and self.num_steps != num_timesteps:
      raise ValueError(
          f'The ddpm sampler runs all T={num_timesteps} steps but sampling.num_steps={self.num_steps}: '
          f'set sampling.num_steps={num_timesteps}, or use sampling.method=ddim for fewer steps.')
    if not isinstance(self.num_steps, int) or not 1 <= self.num_steps <= num_timesteps:
      raise ValueError(f'sampling.num_steps must be an integer in [1, T={num_timesteps}], got {self.num_steps!r}.')
    if self.eta < 0:
      raise ValueError(f'sampling.eta must be >= 0, got {self.eta!r}.')

  def timesteps(self, num_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """The timesteps visited, in sampling order, and each one's successor (-1 after the last).

    DDPM visits T-1, ..., 0. DDIM visits S = num_steps timesteps:
      uniform:   range(0, T, T // S)[:S] (the DDIM code's, exactly S even when S does not divide T);
      quadratic: int(linspace(0, sqrt(0.8 T), S)^2), as the DDIM code (used there for CIFAR-10);
      trailing:  round(arange(T, 0, -T/S)) - 1, which starts at T-1.
    """
    self.check(num_timesteps)
    steps = self.num_steps
    if self.method == 'ddpm':
      ascending = np.arange(num_timesteps)
    elif self.spacing == 'uniform':
      ascending = np.arange(steps) * (num_timesteps // steps)
    elif self.spacing == 'quadratic':
      ascending = (np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2).astype(np.int64)
    else:
      ascending = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps))[::-1].astype(np.int64) - 1
    prev = np.concatenate([[-1], ascending[:-1]])
    return ascending[::-1].astype(np.int32), prev[::-1].astype(np.int32)


def ddpm_step(schedule: Schedule, x_t: jax.Array, t: jax.Array, output: jax.Array, noise: jax.Array, *,
              variance: str, clip_x0: bool, parameterization: str) -> tuple[jax.Array, jax.Array]:
  """One ancestral step x_t -> x_{t-1} of Ho et al.; returns (x_{t-1}, predicted x_0).

  The mean is the posterior mean given the (optionally clipped) predicted x_0; the variance
  is beta_t ('fixedlarge') or the posterior variance ('fixedsmall'); no noise is added at t = 0.
  """
  check_choice('DDPM variance', variance, VARIANCES)
  x0, _ = x0_eps_from_output(schedule, x_t, t, output, parameterization)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, posterior_variance, _ = q_posterior(schedule, x0, x_t, t)
  var = gather(schedule.betas, t, x_t.ndim) if variance == 'fixedlarge' else posterior_variance
  return mean + jnp.where(expand_to(t > 0, x_t.ndim), jnp.sqrt(var), 0.0) * noise, x0


def ddim_step(schedule: Schedule, x_t: jax.Array, t: jax.Array, t_prev: jax.Array, output: jax.Array,
              noise: jax.Array, *, eta: float, clip_x0: bool, parameterization: str) -> tuple[jax.Array, jax.Array]:
  """One DDIM step x_t -> x_{t_prev}; t_prev = -1 means alpha_bar_prev = 1. Returns (x_prev, x_0).

  sigma = eta sqrt((1 - ab_prev)/(1 - ab_t)) sqrt(1 - ab_t/ab_prev);
  x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z.
  With clip_x0, eps is recomputed from the clipped x_0 so that both stay consistent.
  """
  x0, eps = x0_eps_from_output(schedule, x_t, t, output, parameterization)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = eps_from_x0(schedule, x_t, t, x0)
  ab_t = gather(schedule.alphas_cumprod, t, x_t.ndim)
  ab_prev = expand_to(jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0), x_t.ndim)
  sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t)) * jnp.sqrt(1.0 - ab_t / ab_prev)
  direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0)) * eps
  return jnp.sqrt(ab_prev) * x0 + direction + sigma * noise, x0


def sample(model_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule, sampler: Sampler,
           rng: jax.Array, shape: tuple[int, ...], record_every: Optional[int] = None) -> jax.Array:
  """Runs the sampler from x_T ~ N(0, I) of `shape` (B, H, W, C).

  Returns the chain (F, B, H, W, C): x_T, then x after every `record_every`-th step, and
  always the final sample last (chain[-1]); record_every=None keeps only x_T and the sample.
  """
  timesteps, prev_timesteps = sampler.timesteps(schedule.num_timesteps)
  num_steps = len(timesteps)
  record_every = record_every or num_steps
  recorded = [i for i in range(num_steps) if (i + 1) % record_every == 0 or i == num_steps - 1]
  frame_of_step = np.full(num_steps, len(recorded) + 1, np.int32)  # Out of range: not recorded.
  frame_of_step[recorded] = np.arange(1, len(recorded) + 1)

  init_key, loop_key = jax.random.split(rng)
  x_T = jax.random.normal(init_key, shape, jnp.float32)
  chain = jnp.zeros((len(recorded) + 1,) + tuple(shape), jnp.float32).at[0].set(x_T)
  batch = shape[0]

  def body(carry, step_inputs):
    x, chain = carry
    i, t, t_prev, frame = step_inputs
    t_batch = jnp.full((batch,), t, jnp.int32)
    output = model_fn(x, t_batch)
    noise = jax.random.normal(jax.random.fold_in(loop_key, i), shape, jnp.float32)
    if sampler.method == 'ddpm':
      x, _ = ddpm_step(schedule, x, t_batch, output, noise, variance=sampler.variance,
                       clip_x0=sampler.clip_x0, parameterization=sampler.parameterization)
    else:
      x, _ = ddim_step(schedule, x, t_batch, jnp.full((batch,), t_prev, jnp.int32), output, noise,
                       eta=sampler.eta, clip_x0=sampler.clip_x0, parameterization=sampler.parameterization)
    return (x, chain.at[frame].set(x, mode='drop')), None

  step_inputs = (jnp.arange(num_steps), jnp.asarray(timesteps), jnp.asarray(prev_timesteps),
                 jnp.asarray(frame_of_step))
  (_, chain), _ = jax.lax.scan(body, (x_T, chain), step_inputs)
  return chain


def sampler_from_config(config) -> Sampler:
  """The Sampler described by config.sampling and config.diffusion.parameterization."""
  s = config.sampling
  return Sampler(method=s.method, num_steps=s.num_steps, eta=s.eta, spacing=s.spacing, variance=s.variance,
                 clip_x0=s.clip_x0, parameterization=config.diffusion.parameterization)
