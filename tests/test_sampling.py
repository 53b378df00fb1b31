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


def output_from_eps(schedule, x_t, t, eps, parameterization):
  """The output of the given parameterization that means `eps` at (x_t, t)."""
  x0 = diffusion.x0_from_eps(schedule, x_t, t, eps)
  return {'eps': eps, 'x0': x0, 'v': diffusion.v_from_x0_eps(schedule, t, x0, eps)}[parameterization]


@pytest.mark.parametrize('method', ['ddim', 'dpm++2m'])
@pytest.mark.parametrize('spacing', sampling.SPACINGS)
@pytest.mark.parametrize('parameterization', diffusion.PARAMETERIZATIONS)
def test_deterministic_sampler_with_an_oracle_recovers_x0(method, spacing, parameterization):
  """An oracle that knows x0 outputs the exact prediction; DDIM (eta=0) and DPM-Solver++ land on x0 from any x_T."""
  x0 = jax.random.uniform(jax.random.key(0), (3, 5, 5, 2), minval=-1, maxval=1)

  def oracle(x_t, t):
    return output_from_eps(LINEAR, x_t, t, diffusion.eps_from_x0(LINEAR, x_t, t, x0), parameterization)

  sampler = sampling.Sampler(method, 20, eta=0.0, spacing=spacing, clip_x0=False, parameterization=parameterization)
  for seed in (1, 2):
    chain = jax.jit(lambda rng: sampling.sample(oracle, LINEAR, sampler, rng, x0.shape))(jax.random.key(seed))
    np.testing.assert_allclose(chain[-1], x0, atol=1e-5)


@pytest.mark.parametrize('method', ['ddim', 'dpm++2m'])
def test_50_steps_call_the_model_50_times(method):
  calls = []

  def model_fn(x, t):
    jax.debug.callback(lambda t: calls.append(int(t[0])), t)
    return jnp.zeros_like(x)

  sampler = sampling.Sampler(method, 50, eta=0.0)
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
    (dict(method='pndm'), r"Unknown sampler 'pndm'.*'ddim', 'ddpm', 'dpm\+\+2m'"),
    (dict(num_steps=1001), r'num_steps must be an integer in \[1, T=1000\], got 1001'),
    (dict(num_steps=0), r'num_steps must be an integer in \[1, T=1000\], got 0'),
    (dict(eta=-0.5), r'eta must be >= 0, got -0.5'),
    (dict(spacing='cubic'), r"Unknown step spacing 'cubic'"),
    (dict(parameterization='score'), r"Unknown parameterization 'score'"),
    (dict(method='ddpm', num_steps=50), r'ddpm sampler runs all T=1000 steps'),
    (dict(method='dpm++2m', eta=1.0), r'dpm\+\+2m sampler is deterministic but sampling.eta=1.0'),
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


# DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler (fixture from fixtures/make_dpm_fixture.py).
DPM = np.load(os.path.join(FIXTURES, 'dpm_solver_fixture.npz'))
DPM_CASES = sorted(k[:-len('_trajectory')] for k in DPM.files if k.endswith('_trajectory'))
GAUSSIAN_MEAN, GAUSSIAN_STD = 0.3, 0.5  # The fixture's data distribution, N(M, S^2 I).


def gaussian_data_model(schedule, parameterization):
  """The exact denoiser for x_0 ~ N(M, S^2 I), as in make_dpm_fixture.py: a smooth model with a known ODE solution."""

  def model_fn(x, t):
    ab = diffusion.gather(schedule.alphas_cumprod, t, x.ndim)
    eps = jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * GAUSSIAN_MEAN) / (ab * GAUSSIAN_STD**2 + 1 - ab)
    return output_from_eps(schedule, x, t, eps, parameterization)

  return model_fn


@pytest.mark.parametrize('name', DPM_CASES)
def test_dpm_solver_matches_diffusers(name):
  """The whole trajectory, step by step. diffusers' own 'leading' spacing differs from our 'uniform' (it steps by
  T // (S + 1) and never visits t = 0), so the fixture passes our uniform and quadratic timesteps to diffusers."""
  prediction, spacing, steps = name.rsplit('_', 2)
  sampler = sampling.Sampler('dpm++2m', int(steps), eta=0.0, spacing=spacing, clip_x0=False,
                             parameterization=PREDICTION[prediction])
  np.testing.assert_array_equal(sampler.timesteps(1000)[0], DPM[f'{name}_timesteps'])
  model_fn = gaussian_data_model(LINEAR, sampler.parameterization)
  x_T = jnp.asarray(DPM['x_T'])
  chain = jax.jit(lambda x_T: sampling.sample(model_fn, LINEAR, sampler, jax.random.key(0), x_T.shape, 1, x_T))(x_T)
  np.testing.assert_array_equal(chain[0], x_T)
  np.testing.assert_allclose(chain[1:], DPM[f'{name}_trajectory'], atol=1e-4, rtol=1e-4)


def test_dpm_solver_converges_faster_than_ddim():
  """For Gaussian data the ODE keeps z = (x_t - alpha_t M) / sqrt(alpha_t^2 S^2 + sigma_t^2): compare x at t=0.

  (Quadratic spacing ends at t = 0 for every S; the final step to t = -1 returns the x0 prediction, the posterior
  mean, which is not the ODE's endpoint. With S = 100 this spacing also repeats t = 0: it must stay finite.)
  """
  x_T = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  model_fn = gaussian_data_model(LINEAR, 'eps')
  ab = np.asarray(LINEAR.alphas_cumprod, np.float64)
  errors = {}
  for method in ('ddim', 'dpm++2m'):
    for steps in (20, 50, 100):
      sampler = sampling.Sampler(method, steps, eta=0.0, spacing='quadratic', clip_x0=False)
      t_first = sampler.timesteps(1000)[0][0]
      z = (x_T - np.sqrt(ab[t_first]) * GAUSSIAN_MEAN) / np.sqrt(ab[t_first] * GAUSSIAN_STD**2 + 1 - ab[t_first])
      exact = np.sqrt(ab[0]) * GAUSSIAN_MEAN + np.sqrt(ab[0] * GAUSSIAN_STD**2 + 1 - ab[0]) * z
      x_at_0 = sampling.sample(model_fn, LINEAR, sampler, jax.random.key(0), x_T.shape, 1, x_T=x_T)[-2]
      errors[method, steps] = float(jnp.abs(x_at_0 - exact).max())
  assert errors['dpm++2m', 50] < 0.2 * errors['ddim', 50] and errors['dpm++2m', 100] < 1e-3, errors
  assert errors['ddim', 20] / errors['ddim', 50] < 3 < 5 < errors['dpm++2m', 20] / errors['dpm++2m', 50], errors


def test_dpm_solver_step_is_ddim_when_first_order():
  """The first step (t_last = -1) is a DDIM eta=0 step, and a step to t_prev = -1 returns the predicted x0."""
  rng = np.random.default_rng(1)
  x_t, output, x0_last = (jnp.asarray(rng.normal(size=(4, 3, 3, 1)), jnp.float32) for _ in range(3))
  t, t_prev, none = jnp.array([999, 500, 20, 0]), jnp.array([899, 400, -1, -1]), jnp.full((4,), -1)
  for clip in (False, True):
    kwargs = dict(clip_x0=clip, parameterization='eps')
    dpm, x0 = sampling.dpm_solver_2m_step(LINEAR, x_t, t, t_prev, none, output, x0_last, **kwargs)
    ddim, x0_ddim = sampling.ddim_step(LINEAR, x_t, t, t_prev, output, jnp.zeros_like(x_t), eta=0.0, **kwargs)
    np.testing.assert_allclose(dpm, ddim, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(x0, x0_ddim)
    final, _ = sampling.dpm_solver_2m_step(LINEAR, x_t, t, t_prev, t + 100, output, x0_last, **kwargs)
    np.testing.assert_array_equal(final[2:], x0[2:])


def test_sample_from_a_given_x_T():
  model_fn = lambda x, t: 0.1 * x
  sampler = sampling.Sampler('ddim', 5, eta=0.0)
  x_T = jax.random.normal(jax.random.key(1), (2, 3, 3, 1))
  np.testing.assert_array_equal(sampling.sample(model_fn, LINEAR, sampler, jax.random.key(0), x_T.shape, x_T=x_T)[0],
                                x_T)
  with pytest.raises(ValueError, match=r'x_T has shape \(2, 3, 3, 1\) but the sample shape is \(2, 4, 4, 1\)'):
    sampling.sample(model_fn, LINEAR, sampler, jax.random.key(0), (2, 4, 4, 1), x_T=x_T)


# DDIM inversion.
@pytest.mark.parametrize('spacing', sampling.SPACINGS)
@pytest.mark.parametrize('parameterization', diffusion.PARAMETERIZATIONS)
def test_ddim_inversion_is_exact_for_an_eps_that_does_not_depend_on_x(spacing, parameterization):
  """Then the inverse step solves the DDIM step exactly: reconstruction returns x0, and a constant eps e
  inverts x0 to q_sample(x0, t_first, e)."""
  x0 = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=-1, maxval=1)
  e = jax.random.normal(jax.random.key(1), x0.shape)
  sampler = sampling.Sampler('ddim', 20, eta=0.0, spacing=spacing, clip_x0=False, parameterization=parameterization)
  for scale in (lambda t: 1.0, lambda t: 1.0 + diffusion.expand_to(t, 4) / 1000):
    model_fn = lambda x, t: output_from_eps(LINEAR, x, t, scale(t) * e, parameterization)
    x_T = jax.jit(lambda x0: sampling.ddim_invert(model_fn, LINEAR, sampler, x0))(x0)
    rebuilt = jax.jit(lambda x_T: sampling.sample(model_fn, LINEAR, sampler, jax.random.key(2), x0.shape, x_T=x_T))(x_T)
    # x0 outputs at t = 999 carry float32 rounding / sqrt(ab_999), ~150x: 2e-4 there.
    np.testing.assert_allclose(rebuilt[-1], x0, atol=2e-4 if parameterization == 'x0' else 1e-4)
  t_first = jnp.full((2,), sampler.timesteps(1000)[0][0])
  x_T = sampling.ddim_invert(lambda x, t: output_from_eps(LINEAR, x, t, e, parameterization), LINEAR, sampler, x0)
  np.testing.assert_allclose(x_T, diffusion.q_sample(LINEAR, x0, t_first, e), atol=1e-4)


def test_ddim_inversion_then_reconstruction():
  """An oracle model rebuilds x0 to 1e-4; a smooth x-dependent one (Gaussian data) with an O(1/S) error."""
  x0 = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=-1, maxval=1)
  oracle = lambda x_t, t: diffusion.eps_from_x0(LINEAR, x_t, t, x0)
  smooth = gaussian_data_model(LINEAR, 'eps')
  errors = []
  for model_fn, steps in ((oracle, 50), (smooth, 50), (smooth, 100)):
    sampler = sampling.Sampler('ddim', steps, eta=0.0, clip_x0=False)
    x_T = sampling.ddim_invert(model_fn, LINEAR, sampler, x0)
    rebuilt = sampling.sample(model_fn, LINEAR, sampler, jax.random.key(0), x0.shape, x_T=x_T)[-1]
    errors.append(float(jnp.abs(rebuilt - x0).max()))
  assert errors[0] < 1e-4 and errors[1] < 0.1 and 1.8 < errors[1] / errors[2] < 2.2, errors


def test_ddim_inversion_counts_model_calls():
  calls = []

  def model_fn(x, t):
    jax.debug.callback(lambda t: calls.append(int(t[0])), t)
    return jnp.zeros_like(x)

  sampler = sampling.Sampler('ddim', 10, eta=0.0, clip_x0=False)
  jax.block_until_ready(sampling.ddim_invert(model_fn, LINEAR, sampler, jnp.zeros((2, 4, 4, 1))))
  assert calls == list(sampler.timesteps(1000)[0][::-1])


@pytest.mark.parametrize('kwargs', [dict(method='dpm++2m'), dict(eta=0.5), dict(clip_x0=True),
                                    dict(method='ddpm', num_steps=1000)])
def test_ddim_inversion_needs_deterministic_unclipped_ddim(kwargs):
  sampler = sampling.Sampler(**{**dict(method='ddim', num_steps=10, eta=0.0, clip_x0=False), **kwargs})
  with pytest.raises(ValueError, match='DDIM inversion needs a deterministic DDIM sampler without clipping'):
    sampling.ddim_invert(lambda x, t: x, LINEAR, sampler, jnp.zeros((1, 2, 2, 1)))


# Spherical interpolation.
def test_slerp():
  x0, x1 = (jax.random.normal(k, (2, 8, 8, 1)) for k in jax.random.split(jax.random.key(0)))
  np.testing.assert_array_equal(sampling.slerp(x0, x1, 0.0), x0)
  np.testing.assert_array_equal(sampling.slerp(x0, x1, 1.0), x1)
  theta = np.arccos(np.vdot(x0, x1) / (np.linalg.norm(x0) * np.linalg.norm(x1)))
  np.testing.assert_allclose(sampling.slerp(x0, x1, 0.5), (x0 + x1) / (2 * np.cos(theta / 2)), rtol=1e-5, atol=1e-6)
  frames = sampling.slerp(x0, x1, jnp.linspace(0, 1, 5))
  assert frames.shape == (5, 2, 8, 8, 1)
  np.testing.assert_allclose(frames[2], sampling.slerp(x0, x1, 0.5), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sampling.slerp(x0, 2 * x0, 0.25), 1.25 * x0, rtol=1e-6)  # Parallel: linear.


def test_slerp_preserves_the_norm_of_orthogonal_equal_norm_tensors():
  a = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  b = jax.random.normal(jax.random.key(1), a.shape)
  b = b - jnp.vdot(a, b) / jnp.vdot(a, a) * a
  b = b * jnp.linalg.norm(a) / jnp.linalg.norm(b)
  alphas = jnp.linspace(0, 1, 7)
  norms = jnp.linalg.norm(sampling.slerp(a, b, alphas).reshape(7, -1), axis=1)
  np.testing.assert_allclose(norms, jnp.linalg.norm(a), rtol=1e-5)
  np.testing.assert_allclose(sampling.slerp(a, b, 0.5), (a + b) / np.sqrt(2), rtol=1e-5, atol=1e-6)


def test_slerp_errors():
  with pytest.raises(ValueError, match=r'x0 \(2, 8, 8, 1\) and x1 \(2, 8, 8, 3\)'):
    sampling.slerp(jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 8, 8, 3)), 0.5)
  with pytest.raises(ValueError, match=r'slerp alpha must lie in \[0, 1\], got \[1.5\]'):
    sampling.slerp(jnp.ones(3), jnp.ones(3), np.array([0.5, 1.5]))


# Classifier-free guidance.
NUM_CLASSES = 3  # Labels 0, 1, 2; 3 is the null label.
CLASS_SHIFT = jnp.array([0.2, -0.1, 0.3, 0.0])


def conditional_model(x, t, labels):
  return 0.1 * x + CLASS_SHIFT[labels][:, None, None, None] * (1 + t[:, None, None, None] / 1000)


def test_guidance_combines_one_batched_call():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t, labels = jnp.array([10, 900]), np.array([0, 2])
  batches = []

  def counting_model(x, t, labels):
    batches.append(x.shape[0])
    return conditional_model(x, t, labels)

  cond, uncond = conditional_model(x, t, labels), conditional_model(x, t, jnp.full(2, NUM_CLASSES))
  np.testing.assert_allclose(sampling.guided_model_fn(conditional_model, labels, NUM_CLASSES, 0.0)(x, t), cond,
                             rtol=1e-6)
  guided = sampling.guided_model_fn(counting_model, labels, NUM_CLASSES, 2.5)(x, t)
  np.testing.assert_allclose(guided, 3.5 * cond - 2.5 * uncond, rtol=1e-5, atol=1e-6)
  assert batches == [4]


@pytest.mark.parametrize('method', sampling.METHODS)
def test_guidance_inside_sample(method):
  schedule = make_schedule('linear', 100)
  labels = np.array([1, 2])
  sampler = sampling.Sampler(method, 100 if method == 'ddpm' else 10, eta=0.0)
  guided = sampling.guided_model_fn(conditional_model, labels, NUM_CLASSES, 1.5)

  def two_calls(x, t):
    return 2.5 * conditional_model(x, t, labels) - 1.5 * conditional_model(x, t, jnp.full(2, NUM_CLASSES))

  run = lambda model_fn: jax.jit(lambda r: sampling.sample(model_fn, schedule, sampler, r, (2, 8, 8, 1))[-1])(
      jax.random.key(0))
  np.testing.assert_allclose(run(guided), run(two_calls), atol=1e-5)


def test_guidance_label_checks():
  with pytest.raises(ValueError, match=r'Class labels must lie in \[0, 3\), got \[3, -1\]'):
    sampling.guided_model_fn(conditional_model, np.array([0, 3, -1]), NUM_CLASSES, 1.0)
  with pytest.raises(ValueError, match=r'labels must have shape \(B,\), got \(2, 1\)'):
    sampling.guided_model_fn(conditional_model, np.zeros((2, 1), np.int32), NUM_CLASSES, 1.0)
  with pytest.raises(ValueError, match='3 labels for a batch of 2 images'):
    sampling.guided_model_fn(conditional_model, np.zeros(3, np.int32), NUM_CLASSES, 1.0)(jnp.zeros((2, 4, 4, 1)),
                                                                                        jnp.zeros(2, jnp.int32))
  # Traced labels are not checked (here, out of range under jit): the caller's responsibility.
  traced = jax.jit(lambda labels: sampling.guided_model_fn(conditional_model, labels, NUM_CLASSES, 1.0)(
      jnp.zeros((2, 4, 4, 1)), jnp.zeros(2, jnp.int32)))
  assert traced(jnp.array([0, 1])).shape == (2, 4, 4, 1)
