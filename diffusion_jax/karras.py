"""Karras et al. (2022, "EDM") samplers for the discrete-time models: the rho noise levels, the denoiser, the steps.

A variance-preserving x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, rescaled as x = x_t sqrt(1 + sigma^2), is
x = x_0 + sigma eps with sigma_t = sqrt((1 - ab_t) / ab_t) (k-diffusion's view of a DDPM). The probability-flow ODE
is then dx/dsigma = (x - D(x, sigma)) / sigma, where the denoiser D is the x_0 prediction. The samplers integrate
it from sigma_max down to 0 over Karras's noise levels; x is in that scaling throughout. Shapes: x (B, H, W, C),
sigma a scalar or (B,), t int32 (B,). `sampling.sample` runs these steps in its `lax.scan`.
"""
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import expand_to, x0_eps_from_output
from diffusion_jax.schedules import Schedule

METHODS = ('euler', 'heun', 'euler_a')
SIGMA_SCHEDULES = ('karras',)
Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # D(x, sigma) -> the x_0 predicted, x's shape.


def trained_sigmas(schedule: Schedule) -> jax.Array:
  """sigma_t = sqrt((1 - ab_t) / ab_t) (T,), increasing in t: the noise levels the model was trained at."""
  return schedule.sqrt_one_minus_alphas_cumprod / schedule.sqrt_alphas_cumprod


def karras_sigmas(sigma_min, sigma_max, num_steps: int, rho: float) -> jax.Array:
  """Karras et al.'s eq. (5), (num_steps + 1,): (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, then 0.

  With num_steps = n = 1 it is (sigma_max, 0).
  """
  ramp = jnp.linspace(0.0, 1.0, num_steps)
  inv_min, inv_max = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return jnp.append((inv_max + ramp * (inv_min - inv_max)) ** rho, 0.0)


def schedule_sigmas(schedule: Schedule, num_steps: int, rho: float) -> jax.Array:
  """The Karras noise levels (num_steps + 1,) between the model's smallest and largest trained sigma, then 0."""
  sigmas = trained_sigmas(schedule)
  return karras_sigmas(sigmas[0], sigmas[-1], num_steps, rho)


def nearest_timestep(schedule: Schedule, sigma: jax.Array) -> jax.Array:
  """The trained timestep (int32, sigma's shape) whose sigma_t is nearest to sigma in log sigma.

  As k-diffusion's DiscreteSchedule.sigma_to_t with quantize=True: the U-Net only takes integer timesteps.
  """
  distance = jnp.abs(jnp.log(sigma)[..., None] - jnp.log(trained_sigmas(schedule)))
  return jnp.argmin(distance, axis=-1).astype(jnp.int32)


def denoise(model_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule, x: jax.Array,
            sigma: jax.Array, *, clip_x0: bool, parameterization: str) -> jax.Array:
  """D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)), t(sigma) the `nearest_timestep`.

  As k-diffusion's DiscreteEpsDDPMDenoiser (quantize=True): the input is scaled with the exact sigma, the model
  reads the nearest trained t. An x0 or v output is turned into eps at the scaled input and t. With clip_x0, D is
  clipped to [-1, 1]. sigma: a scalar or (B,), > 0.
  """
  sigma = jnp.broadcast_to(sigma, x.shape[:1])
  t = nearest_timestep(schedule, sigma)
  x_in = x * expand_to(jax.lax.rsqrt(1.0 + sigma**2), x.ndim)
  _, eps = x0_eps_from_output(schedule, x_in, t, model_fn(x_in, t), parameterization)
  x0 = x - expand_to(sigma, x.ndim) * eps
  return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def churn_gammas(sigmas: jax.Array, s_churn: float, s_tmin: float, s_tmax: float) -> jax.Array:
  """EDM's churn (n,) for sigmas (n + 1,): min(s_churn / n, sqrt(2) - 1) where s_tmin <= sigma_i <= s_tmax, else 0."""
  num_steps = sigmas.shape[0] - 1
  inside = (sigmas[:-1] >= s_tmin) & (sigmas[:-1] <= s_tmax)
  return jnp.where(inside, min(s_churn / num_steps, 2**0.5 - 1), 0.0)


def churn(x: jax.Array, sigma: jax.Array, gamma: jax.Array, noise: jax.Array,
          s_noise: float) -> tuple[jax.Array, jax.Array]:
  """EDM Algorithm 2's noise increase: (x + s_noise noise sqrt(sigma_hat^2 - sigma^2), sigma_hat = (1 + gamma) sigma).

  The square root is taken as sigma sqrt(gamma (2 + gamma)): exactly 0 for gamma = 0, where XLA's fused
  multiply-adds can make sigma_hat^2 - sigma^2 negative.
  """
  return x + s_noise * sigma * jnp.sqrt(gamma * (2.0 + gamma)) * noise, sigma * (1.0 + gamma)


def euler_step(denoiser: Denoiser, x: jax.Array, sigma: jax.Array,
               sigma_next: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One Euler step of the ODE from sigma to sigma_next (one model call); returns (x_next, D(x, sigma))."""
  denoised = denoiser(x, sigma)
  return x + (x - denoised) / sigma * (sigma_next - sigma), denoised


def heun_step(denoiser: Denoiser, x: jax.Array, sigma: jax.Array,
              sigma_next: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One Heun step (EDM Algorithm 1/2): Euler, then the trapezoidal correction, unless sigma_next = 0 (Euler alone).

  Two model calls, one on the last step (to 0); returns (x_next, D(x, sigma)).
  """
  denoised = denoiser(x, sigma)
  d = (x - denoised) / sigma
  x_euler = x + d * (sigma_next - sigma)

  def correct(x_euler):
    d_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
    return x + 0.5 * (d + d_next) * (sigma_next - sigma)

  return jax.lax.cond(sigma_next > 0, correct, lambda x_euler: x_euler, x_euler), denoised


def euler_ancestral_step(denoiser: Denoiser, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
                         noise: jax.Array, *, eta: float, s_noise: float) -> tuple[jax.Array, jax.Array]:
  """An Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion's euler_ancestral).

  sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
  sigma_down = sqrt(sigma_next^2 - sigma_up^2); x_next = x_down + s_noise sigma_up noise. eta = 1 is the
  ancestral (DDPM-like) sampler, eta = 0 Euler. One model call; returns (x_next, D(x, sigma)).
  """
  denoised = denoiser(x, sigma)
  sigma_up = jnp.minimum(sigma_next, eta * jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
  sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))  # 0 when eta clips sigma_up at sigma_next.
  return x + (x - denoised) / sigma * (sigma_down - sigma) + s_noise * sigma_up * noise, denoised


def step(method: str, denoiser: Denoiser, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array, gamma: jax.Array,
         noise: jax.Array, *, eta: float, s_noise: float) -> tuple[jax.Array, jax.Array]:
  """One step of `method` from sigma to sigma_next; returns (x_next, the first denoised x_0).

  euler and heun first add EDM's churn gamma (`churn`, noise: N(0, I) like x) as k-diffusion's sample_euler and
  sample_heun; euler_a uses the noise for its ancestral step instead.
  """
  if method == 'euler_a':
    return euler_ancestral_step(denoiser, x, sigma, sigma_next, noise, eta=eta, s_noise=s_noise)
  x, sigma_hat = churn(x, sigma, gamma, noise, s_noise)
  return (heun_step if method == 'heun' else euler_step)(denoiser, x, sigma_hat, sigma_next)
