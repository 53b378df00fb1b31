"""Noise schedules: the betas of the forward process and the constants derived from them.

All schedules are computed in float64 with NumPy (as in Ho et al.'s code) and stored
as float32 arrays in a `Schedule` pytree, built once from the config and passed to
the pure functions of `diffusion.py` and `sampling.py`.
"""
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.checks import ConfigError


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """Ho et al.: betas evenly spaced from beta_start to beta_end."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def quadratic_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """Ho et al.'s 'quad': betas whose square roots are evenly spaced."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def sigmoid_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """The Annotated Diffusion Model's sigmoid schedule over [-6, 6]."""
  x = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
  return beta_start + (beta_end - beta_start) / (1.0 + np.exp(-x))


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008) -> np.ndarray:
  """Nichol & Dhariwal: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2.

  Returns shape (T + 1,), alpha_bar at t = 0 .. T (alpha_bar(0) = 1).
  """
  t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((t + s) / (1.0 + s) * np.pi / 2.0) ** 2
  return f / f[0]


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the cosine schedule, clipped at max_beta to avoid a singularity at t = T."""
  alphas_cumprod = cosine_alphas_cumprod(num_timesteps)
  return np.minimum(1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1], max_beta)


# name -> betas(num_timesteps, beta_start, beta_end); the cosine schedule has no beta range.
BETA_SCHEDULES: dict[str, Callable[[int, float, float], np.ndarray]] = {
    'linear': linear_betas,
    'cosine': lambda num_timesteps, beta_start, beta_end: cosine_betas(num_timesteps),
    'quadratic': quadratic_betas,
    'sigmoid': sigmoid_betas,
}


class Schedule(flax.struct.PyTreeNode):
  """Precomputed float32 arrays of shape (T,), indexed by the timestep t in [0, T)."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1.
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array  # beta~_t of q(x_{t-1} | x_t, x_0).
  posterior_log_variance_clipped: jax.Array  # log beta~_t with beta~_0 replaced by beta~_1.
  posterior_mean_coef1: jax.Array  # Multiplies x_0 in the posterior mean.
  posterior_mean_coef2: jax.Array  # Multiplies x_t in the posterior mean.

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def schedule_from_betas(betas: np.ndarray) -> Schedule:
  """Builds the schedule pytree from betas (T,) in (0, 1), computing in float64."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or len(betas) < 2 or not np.all((betas > 0) & (betas < 1)):
    raise ConfigError('betas must be a 1-D array of at least 2 values in (0, 1).')
  alphas_cumprod = np.cumprod(1.0 - betas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  arrays = dict(
      betas=betas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
  )
  return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()})


def make_schedule(name: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """The schedule `name` (one of BETA_SCHEDULES) over `num_timesteps` steps."""
  if name not in BETA_SCHEDULES:
    raise ConfigError(f'Unknown noise schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}.')
  if not isinstance(num_timesteps, int) or num_timesteps < 2:
    raise ConfigError(f'num_timesteps must be an integer >= 2, got {num_timesteps!r}.')
  return schedule_from_betas(BETA_SCHEDULES[name](num_timesteps, beta_start, beta_end))


def schedule_from_config(diffusion_config) -> Schedule:
  """The schedule named by `config.diffusion` (schedule, num_timesteps, beta_start, beta_end)."""
  return make_schedule(diffusion_config.schedule, diffusion_config.num_timesteps,
                       diffusion_config.beta_start, diffusion_config.beta_end)
