"""DDPM, DDIM, DPM-Solver++(2M) and Karras samplers, DDIM inversion, noise slerp and classifier-free guidance.

model_fn(x_t, t) maps images (B, H, W, C) and int32 timesteps (B,) to an output of
x_t's shape in the sampler's parameterization. The loop runs inside `lax.scan`, so a
jitted call to `sample` is one dispatch for the whole chain.

The fast sampler is DPM-Solver++(2M) (Lu et al. 2022): a deterministic second-order multistep solver of the
probability-flow ODE in data (x_0) prediction, which needs one model call per step, like DDIM, but reaches
DDIM's quality in far fewer steps (~20), and whose x_0 form keeps clipping and guidance well-behaved.
Karras et al.'s (2022) Euler, Heun and Euler-ancestral samplers over the rho noise levels are in karras.py.
"""
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import karras
from diffusion_jax.checks import ConfigError, check_choice, check_concrete_range
from diffusion_jax.diffusion import PARAMETERIZATIONS, eps_from_x0, expand_to, gather, q_posterior, x0_eps_from_output
from diffusion_jax.schedules import Schedule

METHODS = ('ddpm', 'ddim', 'dpm++2m') + karras.METHODS
SPACINGS = ('uniform', 'quadratic', 'trailing')
VARIANCES = ('fixedlarge', 'fixedsmall')


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How to sample. num_steps and spacing are used by DDIM and DPM-Solver++, eta by DDIM; DDPM runs all T steps.

  The Karras samplers (karras.METHODS) visit num_steps noise levels of `sigma_schedule` before the final 0; eta is
  euler_a's, the s_* settings are EDM's churn of euler and heun (k-diffusion's sample_euler and sample_heun).
  """
  method: str = 'ddim'
  num_steps: int = 50
  eta: float = 0.0
  spacing: str = 'uniform'
  variance: str = 'fixedlarge'  # DDPM only: beta_t ('fixedlarge') or the posterior variance.
  clip_x0: bool = True
  parameterization: str = 'eps'
  sigma_schedule: str = 'karras'
  rho: float = 7.0
  s_churn: float = 0.0
  s_tmin: float = 0.0
  s_tmax: float = float('inf')
  s_noise: float = 1.0

  def check(self, num_timesteps: int) -> None:
    """Raises a ValueError naming the first setting that is invalid for T = num_timesteps."""
    check_choice('sampler', self.method, METHODS)
    check_choice('step spacing', self.spacing, SPACINGS)
    check_choice('DDPM variance', self.variance, VARIANCES)
    check_choice('parameterization', self.parameterization, PARAMETERIZATIONS)
    if self.method == 'ddpm' and self.num_steps != num_timesteps:
      raise ConfigError(
          f'The ddpm sampler runs all T={num_timesteps} steps but sampling.num_steps={self.num_steps}: '
          f'set sampling.num_steps={num_timesteps}, or use sampling.method=ddim for fewer steps.')
    if not isinstance(self.num_steps, int) or not 1 <= self.num_steps <= num_timesteps:
      raise ConfigError(f'sampling.num_steps must be an integer in [1, T={num_timesteps}], got {self.num_steps!r}.')
    if self.eta < 0:
      raise ConfigError(f'sampling.eta must be >= 0, got {self.eta!r}.')
    if self.method == 'dpm++2m' and self.eta != 0:
      raise ConfigError(f'The dpm++2m sampler is deterministic but sampling.eta={self.eta!r}: set sampling.eta=0, '
                        'or use sampling.method=ddim for eta > 0.')
    self.check_karras()

  def check_karras(self) -> None:
    """Raises a ConfigError naming the first invalid setting of the Karras samplers."""
    check_choice('sigma schedule', self.sigma_schedule, karras.SIGMA_SCHEDULES)
    if not self.rho > 0:
      raise ConfigError(f'sampling.rho must be > 0 (Karras et al. use 7), got {self.rho!r}.')
    for name in ('s_churn', 's_tmin', 's_noise'):
      if not getattr(self, name) >= 0:
        raise ConfigError(f'sampling.{name} must be >= 0, got {getattr(self, name)!r}.')
    if not self.s_tmax >= self.s_tmin:
      raise ConfigError(f'sampling.s_tmax={self.s_tmax!r} is below sampling.s_tmin={self.s_tmin!r}: churn would '
                        'never apply; set s_tmax >= s_tmin (default inf).')
    if self.s_churn and self.method not in ('euler', 'heun'):
      raise ConfigError(f'sampling.s_churn={self.s_churn!r} is EDM churn of the euler and heun samplers, not of '
                        f'{self.method}: set sampling.s_churn=0, or sampling.method=euler or heun.')
    if self.method in ('euler', 'heun') and self.eta != 0:
      raise ConfigError(f'The {self.method} sampler takes no eta but sampling.eta={self.eta!r}: set sampling.eta=0 '
                        '(its noise is EDM churn, sampling.s_churn), or use sampling.method=euler_a for eta > 0.')

  def steps(self, num_timesteps: int) -> int:
    """The number of steps (of the scan): num_steps noise levels for the Karras samplers, else the timesteps."""
    return self.num_steps if self.method in karras.METHODS else len(self.timesteps(num_timesteps)[0])

  def model_calls(self, num_timesteps: int) -> int:
    """Model calls per sample: one a step, except Heun's two a step but one on the last (2 num_steps - 1)."""
    return 2 * self.num_steps - 1 if self.method == 'heun' else self.steps(num_timesteps)

  def timesteps(self, num_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """The timesteps visited, in sampling order, and each one's successor (-1 after the last).

    DDPM visits T-1, ..., 0. DDIM and DPM-Solver++ visit S = num_steps timesteps (the Karras samplers have noise
    levels instead: karras.schedule_sigmas):
      uniform:   range(0, T, T // S)[:S] (the DDIM code's, exactly S even when S does not divide T);
      quadratic: int(linspace(0, sqrt(0.8 T), S)^2), as the DDIM code (used there for CIFAR-10);
      trailing:  round(arange(T, 0, -T/S)) - 1, which starts at T-1.
    """
    self.check(num_timesteps)
    if self.method in karras.METHODS:
      raise ConfigError(f'The {self.method} sampler steps over noise levels (karras.schedule_sigmas), not timesteps.')
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


def predict_x0_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, output: jax.Array, *, clip_x0: bool,
                   parameterization: str) -> tuple[jax.Array, jax.Array]:
  """(x_0, eps) predicted from a model output; with clip_x0, x_0 is clipped to [-1, 1] and eps recomputed from it."""
  x0, eps = x0_eps_from_output(schedule, x_t, t, output, parameterization)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = eps_from_x0(schedule, x_t, t, x0)
  return x0, eps


def alpha_sigma(schedule: Schedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
  """(sqrt(ab_t), sqrt(1 - ab_t)) shaped (B, 1, ..., 1) for t (B,) in [-1, T); t = -1 (x_0 itself) gives (1, 0)."""
  clean = expand_to(t < 0, ndim)
  t = jnp.maximum(t, 0)
  return (jnp.where(clean, 1.0, gather(schedule.sqrt_alphas_cumprod, t, ndim)),
          jnp.where(clean, 0.0, gather(schedule.sqrt_one_minus_alphas_cumprod, t, ndim)))


def half_log_snr(schedule: Schedule, t: jax.Array, ndim: int) -> jax.Array:
  """lambda_t = log(sqrt(ab_t) / sqrt(1 - ab_t)) shaped (B, 1, ..., 1) for t (B,) in [0, T)."""
  return jnp.log(gather(schedule.sqrt_alphas_cumprod, t, ndim) /
                 gather(schedule.sqrt_one_minus_alphas_cumprod, t, ndim))


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
  x0, eps = predict_x0_eps(schedule, x_t, t, output, clip_x0=clip_x0, parameterization=parameterization)
  ab_t = gather(schedule.alphas_cumprod, t, x_t.ndim)
  ab_prev = expand_to(jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0), x_t.ndim)
  sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t)) * jnp.sqrt(1.0 - ab_t / ab_prev)
  direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0)) * eps
  return jnp.sqrt(ab_prev) * x0 + direction + sigma * noise, x0


def dpm_solver_2m_step(schedule: Schedule, x_t: jax.Array, t: jax.Array, t_prev: jax.Array, t_last: jax.Array,
                       output: jax.Array, x0_last: jax.Array, *, clip_x0: bool,
                       parameterization: str) -> tuple[jax.Array, jax.Array]:
  """One DPM-Solver++(2M) step x_t -> x_{t_prev} (Lu et al. 2022, Algorithm 2); returns (x_prev, x_0).

  With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma), h = lambda_prev - lambda_t and
  r = sigma_prev / sigma_t: x_prev = r x_t + (alpha_prev - r alpha_t) D, where D = x_0 + (x_0 - x0_last) h / (2 h_last),
  h_last = lambda_t - lambda_last, and x0_last is the x_0 predicted at t_last, the step before.
  The step is first order (DDIM's, D = x_0) when there is no earlier distinct timestep (t_last = -1 on the first
  step, or t_last = t where a spacing repeats one) and when t_prev = -1 (the last step: lambda_prev is infinite and
  x_prev = x_0), as diffusers' DPMSolverMultistepScheduler with final_sigmas_type='zero'.
  t, t_prev, t_last: int32 (B,); x_t, output, x0_last: (B, H, W, C).
  """
  x0, _ = predict_x0_eps(schedule, x_t, t, output, clip_x0=clip_x0, parameterization=parameterization)
  ndim = x_t.ndim
  alpha_t, sigma_t = alpha_sigma(schedule, t, ndim)
  alpha_prev, sigma_prev = alpha_sigma(schedule, t_prev, ndim)
  second_order = expand_to((t_last > t) & (t_prev >= 0), ndim)  # Else h_last is 0 or undefined, or h infinite.
  lambda_t = half_log_snr(schedule, t, ndim)
  h = half_log_snr(schedule, jnp.maximum(t_prev, 0), ndim) - lambda_t
  h_last = jnp.where(second_order, lambda_t - half_log_snr(schedule, jnp.maximum(t_last, 0), ndim), 1.0)
  d = x0 + jnp.where(second_order, 0.5 * h / h_last, 0.0) * (x0 - x0_last)
  r = sigma_prev / sigma_t
  return r * x_t + (alpha_prev - r * alpha_t) * d, x0


def sample(model_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule, sampler: Sampler,
           rng: jax.Array, shape: tuple[int, ...], record_every: Optional[int] = None,
           x_T: Optional[jax.Array] = None) -> jax.Array:
  """Runs the sampler from x_T of `shape` (B, H, W, C): N(0, I) noise drawn from rng, or the given x_T.

  Given x_T (e.g. from `ddim_invert` or `slerp`), deterministic samplers reconstruct from it; rng still
  draws the noise of stochastic steps. Returns the chain (F, B, H, W, C): x_T, then x after every
  `record_every`-th step, and always the final sample last (chain[-1]); record_every=None keeps only
  x_T and the sample. The Karras samplers start from x = sigma_max x_T (k-diffusion's scaling) and record
  x_t = x / sqrt(1 + sigma^2), the variance-preserving image the other samplers record.
  """
  sampler.check(schedule.num_timesteps)
  num_steps = sampler.steps(schedule.num_timesteps)
  record_every = record_every or num_steps
  recorded = [i for i in range(num_steps) if (i + 1) % record_every == 0 or i == num_steps - 1]
  frame_of_step = np.full(num_steps, len(recorded) + 1, np.int32)  # Out of range: not recorded.
  frame_of_step[recorded] = np.arange(1, len(recorded) + 1)

  init_key, loop_key = jax.random.split(rng)
  if x_T is None:
    x_T = jax.random.normal(init_key, shape, jnp.float32)
  elif tuple(x_T.shape) != tuple(shape):
    raise ConfigError(f'x_T has shape {tuple(x_T.shape)} but the sample shape is {tuple(shape)}.')
  else:
    x_T = jnp.asarray(x_T, jnp.float32)
  chain = jnp.zeros((len(recorded) + 1,) + tuple(shape), jnp.float32).at[0].set(x_T)
  noise = lambda i: jax.random.normal(jax.random.fold_in(loop_key, i), shape, jnp.float32)
  kwargs = dict(clip_x0=sampler.clip_x0, parameterization=sampler.parameterization)
  if sampler.method in karras.METHODS:
    return _sample_karras(model_fn, schedule, sampler, x_T, chain, frame_of_step, noise, kwargs)

  timesteps, prev_timesteps = sampler.timesteps(schedule.num_timesteps)
  last_timesteps = np.concatenate([[-1], timesteps[:-1]]).astype(np.int32)  # -1: no step before.
  batch = shape[0]

  def body(carry, step_inputs):
    x, x0_last, chain = carry
    i, frame, *step_timesteps = step_inputs
    t, t_prev, t_last = (jnp.full((batch,), s, jnp.int32) for s in step_timesteps)
    output = model_fn(x, t)
    if sampler.method == 'dpm++2m':
      x, x0 = dpm_solver_2m_step(schedule, x, t, t_prev, t_last, output, x0_last, **kwargs)
    elif sampler.method == 'ddpm':
      x, x0 = ddpm_step(schedule, x, t, output, noise(i), variance=sampler.variance, **kwargs)
    else:
      x, x0 = ddim_step(schedule, x, t, t_prev, output, noise(i), eta=sampler.eta, **kwargs)
    return (x, x0, chain.at[frame].set(x, mode='drop')), None

  step_inputs = (np.arange(num_steps), frame_of_step, timesteps, prev_timesteps, last_timesteps)
  (_, _, chain), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T), chain), tuple(map(jnp.asarray, step_inputs)))
  return chain


def _sample_karras(model_fn, schedule: Schedule, sampler: Sampler, x_T: jax.Array, chain: jax.Array,
                   frame_of_step: np.ndarray, noise: Callable[[jax.Array], jax.Array], kwargs: dict) -> jax.Array:
  """`sample`'s scan for the Karras samplers: karras.step over karras.schedule_sigmas, from x = sigma_max x_T."""
  sigmas = karras.schedule_sigmas(schedule, sampler.num_steps, sampler.rho)
  gammas = karras.churn_gammas(sigmas, sampler.s_churn, sampler.s_tmin, sampler.s_tmax)
  denoiser = lambda x, sigma: karras.denoise(model_fn, schedule, x, sigma, **kwargs)

  def body(carry, step_inputs):
    x, chain = carry
    i, frame, sigma, sigma_next, gamma = step_inputs
    x, _ = karras.step(sampler.method, denoiser, x, sigma, sigma_next, gamma, noise(i), eta=sampler.eta,
                       s_noise=sampler.s_noise)
    return (x, chain.at[frame].set(x * jax.lax.rsqrt(1.0 + sigma_next**2), mode='drop')), None

  step_inputs = (jnp.arange(sampler.num_steps), jnp.asarray(frame_of_step), sigmas[:-1], sigmas[1:], gammas)
  (_, chain), _ = jax.lax.scan(body, (sigmas[0] * x_T, chain), step_inputs)
  return chain


def ddim_invert_step(schedule: Schedule, x_prev: jax.Array, t_prev: jax.Array, t: jax.Array, output: jax.Array, *,
                     parameterization: str) -> jax.Array:
  """One inverse DDIM (eta = 0) step x_{t_prev} -> x_t for t > t_prev (t_prev = -1: x_prev is the image x_0).

  `output` is model_fn(x_prev, t): the model is evaluated at the less noisy point and read as if x_prev were
  at t (the usual approximation, as diffusers' DDIMInverseScheduler). With its eps:
  x_t = alpha_t (x_prev - sigma_prev eps) / alpha_prev + sigma_t eps, exact when eps does not depend on x.
  t_prev, t: int32 (B,); x_prev, output: (B, H, W, C).
  """
  _, eps = x0_eps_from_output(schedule, x_prev, t, output, parameterization)
  alpha_prev, sigma_prev = alpha_sigma(schedule, t_prev, x_prev.ndim)
  alpha_t, sigma_t = alpha_sigma(schedule, t, x_prev.ndim)
  return alpha_t * (x_prev - sigma_prev * eps) / alpha_prev + sigma_t * eps


def ddim_invert(model_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule, sampler: Sampler,
                x0: jax.Array) -> jax.Array:
  """DDIM inversion: images x0 (B, H, W, C) in [-1, 1] -> the x_T from which sample(..., x_T=x_T) rebuilds them.

  Runs `ddim_invert_step` over the sampler's timesteps in reverse, in one `lax.scan` of S model calls; x_T is
  at the sampler's first timestep. Needs method='ddim', eta=0 and clip_x0=False (clipping is not invertible).
  """
  if sampler.method != 'ddim' or sampler.eta != 0 or sampler.clip_x0:
    raise ConfigError('DDIM inversion needs a deterministic DDIM sampler without clipping (method=ddim, eta=0, '
                      f'clip_x0=False), got method={sampler.method!r}, eta={sampler.eta!r}, '
                      f'clip_x0={sampler.clip_x0!r}.')
  timesteps, prev_timesteps = sampler.timesteps(schedule.num_timesteps)
  batch = x0.shape[0]

  def body(x, step_inputs):
    t, t_prev = (jnp.full((batch,), s, jnp.int32) for s in step_inputs)
    return ddim_invert_step(schedule, x, t_prev, t, model_fn(x, t), parameterization=sampler.parameterization), None

  x_T, _ = jax.lax.scan(body, x0, (jnp.asarray(timesteps[::-1]), jnp.asarray(prev_timesteps[::-1])))
  return x_T


def slerp(x0: jax.Array, x1: jax.Array, alpha) -> jax.Array:
  """Spherical interpolation from x0 (alpha = 0) to x1 (alpha = 1), e.g. between two x_T noise tensors.

  Each tensor is one vector; with theta the angle between them, returns
  sin((1 - alpha) theta) / sin(theta) x0 + sin(alpha theta) / sin(theta) x1 (linear interpolation where
  sin(theta) ~ 0). alpha: a scalar or array in [0, 1] of shape A; the result has shape A + x0.shape.
  """
  if jnp.shape(x0) != jnp.shape(x1):
    raise ConfigError(f'slerp needs tensors of one shape, got x0 {jnp.shape(x0)} and x1 {jnp.shape(x1)}.')
  check_concrete_range('slerp alpha', alpha, 0, 1, high_inclusive=True)
  alpha = jnp.asarray(alpha, jnp.float32)
  alpha = alpha.reshape(alpha.shape + (1,) * jnp.ndim(x0))
  cos = jnp.vdot(x0, x1) / (jnp.linalg.norm(x0) * jnp.linalg.norm(x1))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  sin = jnp.sin(theta)
  curved = sin > 1e-6  # False also for NaN (a zero tensor).
  safe_sin = jnp.where(curved, sin, 1.0)
  w0 = jnp.where(curved, jnp.sin((1.0 - alpha) * theta) / safe_sin, 1.0 - alpha)
  w1 = jnp.where(curved, jnp.sin(alpha * theta) / safe_sin, alpha)
  return w0 * x0 + w1 * x1


def guided_model_fn(model_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], labels: jax.Array,
                    null_label: int, guidance_scale: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Classifier-free guidance (Ho & Salimans 2022) as a model_fn(x_t, t) for `sample`.

  model_fn(x, t, labels) takes int32 labels (B,) in [0, null_label], null_label meaning "unconditional".
  Each call evaluates the conditional and unconditional outputs in one model call on the batch doubled to 2B
  and returns (1 + w) cond - w uncond, w = guidance_scale (w = 0: conditional). The weights sum to 1, so this
  is the same guidance for eps, x0 and v outputs. Concrete labels outside [0, null_label) raise a ValueError;
  traced labels (under jit) are not checked.
  """
  if jnp.ndim(labels) != 1:
    raise ConfigError(f'labels must have shape (B,), got {jnp.shape(labels)}.')
  check_concrete_range('Class labels', labels, 0, null_label, high_inclusive=False)
  labels = jnp.asarray(labels, jnp.int32)
  both_labels = jnp.concatenate([labels, jnp.full_like(labels, null_label)])

  def guided(x: jax.Array, t: jax.Array) -> jax.Array:
    if x.shape[0] != labels.shape[0]:
      raise ConfigError(f'{labels.shape[0]} labels for a batch of {x.shape[0]} images.')
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both_labels)
    cond, uncond = jnp.split(out, 2)
    return (1.0 + guidance_scale) * cond - guidance_scale * uncond

  return guided


def sampler_from_config(config) -> Sampler:
  """The Sampler described by config.sampling and config.diffusion.parameterization."""
  s = config.sampling
  return Sampler(method=s.method, num_steps=s.num_steps, eta=s.eta, spacing=s.spacing, variance=s.variance,
                 clip_x0=s.clip_x0, parameterization=config.diffusion.parameterization,
                 sigma_schedule=s.sigma_schedule, rho=s.rho, s_churn=s.s_churn, s_tmin=s.s_tmin, s_tmax=s.s_tmax,
                 s_noise=s.s_noise)
