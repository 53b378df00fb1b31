"""DDPM/DDIM samplers: timesteps, identities, an oracle model, call counts and diffusers parity."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from diffusion_jax import diffusion, sampling
from diffusion_jax.schedules import make_schedule

LINEAR = make_schedule('linear', 1000)


def test_uniform_and_quadratic_spacing():
  t, t_prev = sampling.Sampler('ddim', 10, spacing='uniform').timesteps(1000)
  np.testing.assert_array_equal(t, np.arange(900, -1, -100))  # The DDIM code's range(0, T, T // S).
  np.testing.assert_array_equal(t_prev, np.append(np.arange(800, -1, -100), -1))
  t, _ = sampling.Sampler('ddim', 7, spacing='uniform').timesteps(1000)
  np.testing.assert_array_equal(t, np.arange(0, 1000, 142)[:7][::-1])  # Exactly S steps.
  t, _ = sampling.Sampler('ddim', 10, spacing='quadratic').timesteps(1000)
  np.testing.assert_array_equal(t[::-1], [int(x) for x in np.linspace(0, np.sqrt(800), 10) ** 2])
  t, _ = sampling.Sampler('ddim', 10, spacing='trailing').timesteps(1000)
  assert t[0] == 999 and t[-1] == 99 and len(set(t)) == 10
  t, t_prev = sampling.Sampler('ddpm', 1000).timesteps(1000)
  np.testing.assert_array_equal(t, np.arange(999, -1, -1))
  np.testing.assert_array_equal(t_prev, t - 1)


def test_ddim_eta1_full_steps_uses_the_ddpm_fixedsmall_variance():
  """DDIM with eta=1 and S=T is DDPM with the posterior ('fixedsmall') variance, step by step."""
  rng = np.random.default_rng(0)
  x_t, output, noise = (jnp.asarray(rng.normal(size=(6, 4, 4, 1)), jnp.float32) for _ in range(3))
  t = jnp.array([999, 700, 300, 50, 1, 0])
  for clip in (False, True):
    ddim, x0_ddim = sampling.ddim_step(LINEAR, x_t, t, t - 1, output, noise, eta=1.0, clip_x0=clip,
                                       parameterization='eps')
    ddpm, x0_ddpm = sampling.ddpm_step(LINEAR, x_t, t, output, noise, variance='fixedsmall', clip_x0=clip,
                                       parameterization='eps')
    np.testing.assert_allclose(x0_ddim, x0_ddpm, rtol=1e-6)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('spacing', sampling.SPACINGS)
@pytest.mark.parametrize('parameterization', diffusion.PARAMETERIZATIONS)
def test_ddim_eta0_with_an_oracle_recovers_x0(spacing, parameterization):
  """An oracle that knows x0 outputs the exact prediction; DDIM (eta=0) then lands on x0 from any x_T."""
  x0 = jax.random.uniform(jax.random.key(0), (3, 5, 5, 2), minval=-1, maxval=1)

  def oracle(x_t, t):
    eps = diffusion.eps_from_x0(LINEAR, x_t, t, x0)
    return {'eps': eps, 'x0': x0, 'v': diffusion.v_from_x0_eps(LINEAR, t, x0, eps)}[parameterization]

  sampler = sampling.Sampler('ddim', 20, eta=0.0, spacing=spacing, clip_x0=False, parameterization=parameterization)
  for seed in (1, 2):
    chain = jax.jit(lambda rng: sampling.sample(oracle, LINEAR, sampler, rng, x0.shape))(jax.random.key(seed))
    np.testing.assert_allclose(chain[-1], x0, atol=1e-5)


def test_ddim_50_steps_calls_the_model_50_times():
  calls = []

  def model_fn(x, t):
    jax.debug.callback(lambda t: calls.append(int(t[0])), t)
    return jnp.zeros_like(x)

  sampler = sampling.Sampler('ddim', 50)
  jax.block_until_ready(jax.jit(lambda r: sampling.sample(model_fn, LINEAR, sampler, r, (2, 4, 4, 1)))(
      jax.random.key(0)))
  assert calls == list(sampler.timesteps(1000)[0])
  assert len(calls) == 50


def test_chain_recording():
  model_fn = lambda x, t: jnp.zeros_like(x)
  sampler = sampling.Sampler('ddim', 10, eta=0.0, clip_x0=False)
  sample = jax.jit(sampling.sample, static_argnums=(0, 2, 4, 5))
  full = sample(model_fn, LINEAR, sampler, jax.random.key(3), (2, 4, 4, 1), None)
  chain = sample(model_fn, LINEAR, sampler, jax.random.key(3), (2, 4, 4, 1), 3)
  assert full.shape == (2, 2, 4, 4, 1) and chain.shape == (5, 2, 4, 4, 1)  # x_T, after steps 3, 6, 9, 10.
  np.testing.assert_array_equal(chain[0], full[0])
  np.testing.assert_array_equal(chain[-1], full[-1])
  # With a zero eps-model, each DDIM step scales x by sqrt(ab_prev / ab_t): check frame 1 (after 3 steps).
  t, t_prev = sampler.timesteps(1000)
  ab = np.asarray(LINEAR.alphas_cumprod, np.float64)
  np.testing.assert_allclose(chain[1], chain[0] * np.sqrt(ab[t_prev[2]] / ab[t[0]]), rtol=1e-4)


def test_sampling_is_deterministic_given_the_key():
  model_fn = lambda x, t: 0.1 * x
  sampler = sampling.Sampler('ddim', 5, eta=1.0)
  run = jax.jit(lambda r: sampling.sample(model_fn, LINEAR, sampler, r, (2, 3, 3, 1))[-1])
  np.testing.assert_array_equal(run(jax.random.key(7)), run(jax.random.key(7)))
  assert not np.allclose(run(jax.random.key(7)), run(jax.random.key(8)))


@pytest.mark.parametrize('kwargs, message', [
    (dict(method='pndm'), r"Unknown sampler 'pndm'.*'ddim', 'ddpm'"),
    (dict(num_steps=1001), r'num_steps must be an integer in \[1, T=1000\], got 1001'),
    (dict(num_steps=0), r'num_steps must be an integer in \[1, T=1000\], got 0'),
    (dict(eta=-0.5), r'eta must be >= 0, got -0.5'),
    (dict(spacing='cubic'), r"Unknown step spacing 'cubic'"),
    (dict(parameterization='score'), r"Unknown parameterization 'score'"),
    (dict(method='ddpm', num_steps=50), r'ddpm sampler runs all T=1000 steps'),
])
def test_bad_sampler_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sampling.Sampler(**kwargs).check(1000)


# Independent reference: diffusers' DDPMScheduler and DDIMScheduler (fixtures from make_diffusers_fixtures.py).
with open(os.path.join(FIXTURES, 'diffusers_schedulers.json')) as f:
  CASES = json.load(f)['cases']
ARRAYS = np.load(os.path.join(FIXTURES, 'diffusers_schedulers.npz'))
SCHEDULES = {'linear': LINEAR, 'squaredcos_cap_v2': make_schedule('cosine', 1000)}
PREDICTION = {'epsilon': 'eps', 'sample': 'x0', 'v_prediction': 'v'}


def test_fixture_schedules_match():
  np.testing.assert_allclose(LINEAR.alphas_cumprod, ARRAYS['alphas_cumprod_linear'], rtol=1e-5)
  np.testing.assert_allclose(SCHEDULES['squaredcos_cap_v2'].betas, ARRAYS['betas_cosine'], rtol=1e-5)
  for steps in (10, 50):
    np.testing.assert_array_equal(sampling.Sampler('ddim', steps).timesteps(1000)[0], ARRAYS[f'ddim_timesteps_{steps}'])


def is_deliberate_difference(case):
  """Our DDIM recomputes eps from the clipped x0 (diffusers' use_clipped_model_output=True)."""
  return case['scheduler'] == 'ddim' and case['clip_sample'] and not case['use_clipped_model_output']


@pytest.mark.parametrize('case', CASES, ids=lambda c: f"{c['id']}-{c['scheduler']}-t{c['t']}")
def test_step_matches_diffusers(case):
  if is_deliberate_difference(case):
    pytest.skip('deliberate: eps is recomputed from the clipped x0 (use_clipped_model_output=True)')
  get = lambda name: jnp.asarray(ARRAYS[f"{case['id']}_{name}"])
  x_t, output, noise = get('sample'), get('model_output'), get('noise')
  schedule = SCHEDULES[case['beta_schedule']]
  t = jnp.full((x_t.shape[0],), case['t'])
  kwargs = dict(clip_x0=case['clip_sample'], parameterization=PREDICTION[case['prediction_type']])
  if case['scheduler'] == 'ddpm':
    variance = {'fixed_small': 'fixedsmall', 'fixed_large': 'fixedlarge'}[case['variance_type']]
    prev, x0 = sampling.ddpm_step(schedule, x_t, t, output, noise, variance=variance, **kwargs)
  else:
    t_prev = jnp.full_like(t, max(case['prev_t'], -1))
    prev, x0 = sampling.ddim_step(schedule, x_t, t, t_prev, output, noise, eta=case['eta'], **kwargs)
  if case['scheduler'] == 'ddpm':
    # diffusers computes beta_t = 1 - ab_t / ab_prev and 1 - ab_prev in float32, which cancel at small t
    # (a relative error of ~1e-7 / (1 - ab_0): up to 2e-3 for the cosine schedule at t=1); we precompute
    # in float64. So ours must match a float64 re-derivation of the step to 1e-5, diffusers to 2e-3.
    # float32 sums of terms of magnitude M carry an absolute error of ~M * 1e-7 (M ~ 130 at cosine t=999).
    magnitude = max(1.0, float(np.abs(x0).max()) / 10)
    np.testing.assert_allclose(prev, ddpm_step_float64(case, schedule, variance), atol=1e-5 * magnitude, rtol=1e-5)
    tolerance = 2e-3 if case['t'] <= 10 or case['t'] == 999 else 1e-5
    np.testing.assert_allclose(prev, get('prev_sample'), atol=tolerance, rtol=tolerance)
  else:
    np.testing.assert_allclose(prev, get('prev_sample'), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(x0, get('pred_original_sample'), atol=1e-5, rtol=1e-5)


def ddpm_step_float64(case, schedule, variance):
  """The DDPM step of the fixture case in float64 NumPy, from Ho et al.'s equations."""
  get = lambda name: ARRAYS[f"{case['id']}_{name}"].astype(np.float64)
  x_t, output, noise = get('sample'), get('model_output'), get('noise')
  betas = np.asarray(schedule.betas, np.float64)
  ab = np.cumprod(1 - betas)
  t = case['t']
  ab_t, ab_prev, beta = ab[t], (ab[t - 1] if t > 0 else 1.0), betas[t]
  x0 = {'epsilon': (x_t - np.sqrt(1 - ab_t) * output) / np.sqrt(ab_t), 'sample': output,
        'v_prediction': np.sqrt(ab_t) * x_t - np.sqrt(1 - ab_t) * output}[case['prediction_type']]
  if case['clip_sample']:
    x0 = np.clip(x0, -1, 1)
  mean = (np.sqrt(ab_prev) * beta * x0 + np.sqrt(1 - beta) * (1 - ab_prev) * x_t) / (1 - ab_t)
  var = beta if variance == 'fixedlarge' else beta * (1 - ab_prev) / (1 - ab_t)
  return mean + (np.sqrt(var) * noise if t > 0 else 0)


def test_deliberate_difference_is_small_but_real():
  """Where diffusers keeps the unclipped eps, our clipped-consistent eps differs only if clipping bites."""
  cases = [c for c in CASES if is_deliberate_difference(c)]
  assert cases
  for case in cases[:20]:
    x0 = ARRAYS[f"{case['id']}_pred_original_sample"]
    assert np.all(np.abs(x0) <= 1.0)
