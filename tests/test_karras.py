"""Karras et al. (2022) samplers: k-diffusion parity, exact oracles, call counts, bad settings, the tiny model."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from configs.tiny import get_config as tiny_config
from diffusion_jax import diffusion, experiment, karras, sampling
from test_sampling import LINEAR, gaussian_data_model, output_from_eps

# k-diffusion 0.1.1.post1 in float64 (fixtures/make_karras_fixture.py): sigmas, denoiser, per-step states.
KD = np.load(os.path.join(FIXTURES, 'karras_fixture.npz'))
CHURN = dict(s_churn=2.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)
CASES = {  # As the fixture's: name -> (method, num_steps, rho, Sampler settings).
    'euler': ('euler', 10, 7.0, {}),
    'heun': ('heun', 10, 7.0, {}),
    'heun_rho3': ('heun', 4, 3.0, {}),
    'euler_churn': ('euler', 10, 7.0, CHURN),
    'heun_churn': ('heun', 10, 7.0, CHURN),
    'euler_a': ('euler_a', 10, 7.0, dict(eta=1.0, s_noise=1.0)),
    'euler_a_eta0.5': ('euler_a', 10, 7.0, dict(eta=0.5, s_noise=1.1)),
}
DETERMINISTIC = ['euler', 'heun', 'heun_rho3']


def f32(name):
  return jnp.asarray(KD[name], jnp.float32)


def test_fixture_schedule_matches():
  np.testing.assert_allclose(LINEAR.alphas_cumprod, KD['alphas_cumprod'], rtol=1e-6)


@pytest.mark.parametrize('num_steps, rho', [(10, 7.0), (4, 3.0), (1, 7.0), (50, 7.0)])
def test_sigmas_match_k_diffusion(num_steps, rho):
  sigmas = karras.schedule_sigmas(LINEAR, num_steps, rho)
  assert sigmas.shape == (num_steps + 1,) and sigmas[-1] == 0
  np.testing.assert_allclose(sigmas, KD[f'sigmas_{num_steps}_{rho}'], rtol=2e-6)


def test_sigma_range_is_the_trained_one():
  """sigma_t = sqrt((1 - ab_t) / ab_t) from the betas in float64: the schedule runs from sigma_{T-1} to sigma_0."""
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  np.testing.assert_allclose(karras.trained_sigmas(LINEAR), np.sqrt((1 - ab) / ab), rtol=1e-6)
  sigmas = np.asarray(karras.schedule_sigmas(LINEAR, 7, 7.0))
  np.testing.assert_allclose(sigmas[[0, -2]], np.sqrt((1 - ab) / ab)[[-1, 0]], rtol=1e-6)


@pytest.mark.parametrize('parameterization', diffusion.PARAMETERIZATIONS)
def test_denoiser_matches_k_diffusion(parameterization):
  """DiscreteEpsDDPMDenoiser(quantize=True): the nearest trained t, and D for eps, x0 and v outputs of one model."""
  sigmas = f32('denoise_sigmas')
  np.testing.assert_array_equal(karras.nearest_timestep(LINEAR, sigmas), KD['denoise_t'])
  model_fn = gaussian_data_model(LINEAR, parameterization)
  for sigma, expected in zip(sigmas, KD['denoise_out']):
    out = karras.denoise(model_fn, LINEAR, f32('x_denoise') * sigma, sigma, clip_x0=False,
                         parameterization=parameterization)
    np.testing.assert_allclose(out, expected, atol=1e-5 * (1 + float(sigma)), rtol=1e-5)


@functools.partial(jax.jit, static_argnames=('method', 'eta', 's_noise'))
def karras_step(x, sigma, sigma_next, gamma, noise, method, eta, s_noise):
  denoiser = lambda x, sigma: karras.denoise(gaussian_data_model(LINEAR, 'eps'), LINEAR, x, sigma, clip_x0=False,
                                             parameterization='eps')
  return karras.step(method, denoiser, x, sigma, sigma_next, gamma, noise, eta=eta, s_noise=s_noise)


@pytest.mark.parametrize('case', list(CASES))
def test_each_step_matches_k_diffusion(case):
  """Every step from k-diffusion's state before it (with its noise), and the whole run from our own states."""
  method, num_steps, rho, settings = CASES[case]
  sampler = sampling.Sampler(method, num_steps, rho=rho, clip_x0=False, **settings)
  sigmas = karras.schedule_sigmas(LINEAR, num_steps, rho)
  gammas = karras.churn_gammas(sigmas, sampler.s_churn, sampler.s_tmin, sampler.s_tmax)
  np.testing.assert_allclose(sigmas[:-1] * (1 + gammas), KD[f'{case}_sigma_hat'], rtol=2e-6)
  if sampler.s_churn:
    assert 0 < np.count_nonzero(gammas) < num_steps  # s_tmin and s_tmax leave some steps without churn.
  states = f32(f'{case}_states')
  before = jnp.concatenate([sigmas[:1, None, None, None, None] * f32('x_T')[None], states[:-1]])
  ours = before[0]
  for i in range(num_steps):
    step = functools.partial(karras_step, sigma=sigmas[i], sigma_next=sigmas[i + 1], gamma=gammas[i],
                             noise=f32('noise')[i], method=method, eta=sampler.eta, s_noise=sampler.s_noise)
    x_next, denoised = step(before[i])
    np.testing.assert_allclose(x_next, states[i], atol=1e-5, rtol=1e-5, err_msg=f'step {i}')
    # D = x - sigma eps cancels terms of size sigma (the state's float32 rounding): atol 1e-5 (1 + sigma).
    np.testing.assert_allclose(denoised, KD[f'{case}_denoised'][i], atol=1e-5 * (1 + float(sigmas[i])), rtol=1e-5,
                               err_msg=f'step {i}')
    ours, _ = step(ours)
    np.testing.assert_allclose(ours, states[i], atol=1e-5, rtol=1e-5, err_msg=f'run, step {i}')


@pytest.mark.parametrize('case', DETERMINISTIC)
def test_sample_matches_k_diffusion(case):
  """sampling.sample's scan from a given x_T: the chain is x_T, then each state x / sqrt(1 + sigma^2); the sample."""
  method, num_steps, rho, _ = CASES[case]
  sampler = sampling.Sampler(method, num_steps, rho=rho, clip_x0=False)
  x_T = f32('x_T')
  chain = jax.jit(lambda x_T: sampling.sample(gaussian_data_model(LINEAR, 'eps'), LINEAR, sampler,
                                              jax.random.key(0), x_T.shape, 1, x_T))(x_T)
  assert chain.shape == (num_steps + 1,) + x_T.shape
  np.testing.assert_array_equal(chain[0], x_T)
  sigmas = np.asarray(KD[f'sigmas_{num_steps}_{rho}'], np.float64)[1:, None, None, None, None]
  np.testing.assert_allclose(chain[1:] * np.sqrt(1 + sigmas**2), KD[f'{case}_states'], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(chain[-1], KD[f'{case}_states'][-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('method', ['euler', 'heun'])
def test_steps_with_the_exact_denoiser_follow_the_ode_exactly(method):
  """Data = one point x*: D = x*, and the ODE's solution is x(sigma) = x* + sigma / sigma_max (x_T' - x*), a line that
  Euler and Heun follow exactly, step by step, down to x* at sigma = 0."""
  x_star = jax.random.uniform(jax.random.key(0), (2, 4, 4, 1), minval=-1, maxval=1)
  x = x_start = 80.0 * jax.random.normal(jax.random.key(1), x_star.shape)
  sigmas = np.array([80.0, 20.0, 3.0, 0.4, 0.02, 0.0], np.float32)
  for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
    x, denoised = karras.step(method, lambda x, sigma: x_star, x, sigma, sigma_next, 0.0, jnp.ones_like(x), eta=0.0,
                              s_noise=1.0)
    np.testing.assert_array_equal(denoised, x_star)
    np.testing.assert_allclose(x, x_star + sigma_next / 80.0 * (x_start - x_star), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(x, x_star, atol=2e-6)


def test_euler_ancestral_keeps_the_noise_level():
  """Data = one point x*, x - x* ~ N(0, sigma^2): the ancestral step (eta = 1) lands on N(0, sigma_next^2) about x*,
  as sigma_down^2 + sigma_up^2 = sigma_next^2; with eta = 0 it is the (deterministic) Euler step."""
  shape, x_star = (64, 16, 16, 1), 0.25
  x = 5.0 * jax.random.normal(jax.random.key(0), shape)
  noise = jax.random.normal(jax.random.key(1), shape)
  denoiser = lambda x, sigma: jnp.full_like(x, x_star)
  x_next, _ = karras.euler_ancestral_step(denoiser, x + x_star, 5.0, 2.0, noise, eta=1.0, s_noise=1.0)
  assert abs(float(jnp.std(x_next - x_star)) - 2.0) < 0.03
  assert 0.35 < float(jnp.corrcoef(x_next.ravel(), x.ravel())[0, 1]) < 0.45  # sigma_down / sigma_next = 0.4
  euler, _ = karras.euler_step(denoiser, x + x_star, 5.0, 2.0)
  deterministic, _ = karras.euler_ancestral_step(denoiser, x + x_star, 5.0, 2.0, noise, eta=0.0, s_noise=1.0)
  np.testing.assert_allclose(deterministic, euler, rtol=1e-6)


@pytest.mark.parametrize('method, settings', [('euler', {}), ('heun', {}), ('euler_a', dict(eta=1.0)),
                                              ('heun', CHURN), ('euler', CHURN)])
@pytest.mark.parametrize('parameterization', diffusion.PARAMETERIZATIONS)
def test_samplers_with_an_oracle_land_on_the_data_point(method, settings, parameterization):
  """An oracle for data x* outputs the exact prediction at each trained t; the last noise level is sigma_0, trained,
  so every sampler's last step denoises to x* exactly (churn stops above it: s_tmin = 0.05), with or without clip."""
  x_star = jax.random.uniform(jax.random.key(0), (3, 5, 5, 2), minval=-1, maxval=1)

  def oracle(x_t, t):
    return output_from_eps(LINEAR, x_t, t, diffusion.eps_from_x0(LINEAR, x_t, t, x_star), parameterization)

  for clip_x0 in (False, True):
    sampler = sampling.Sampler(method, 8, clip_x0=clip_x0, parameterization=parameterization, **settings)
    chain = jax.jit(lambda rng: sampling.sample(oracle, LINEAR, sampler, rng, x_star.shape))(jax.random.key(1))
    np.testing.assert_allclose(chain[-1], x_star, atol=1e-5)


@pytest.mark.parametrize('method, calls', [('euler', 6), ('heun', 11), ('euler_a', 6)])
def test_model_calls_and_timesteps(method, calls):
  """Heun makes 2 n - 1 calls (its last step is Euler); each call reads the trained t nearest in log sigma."""
  visited = []

  def model_fn(x, t):
    jax.debug.callback(lambda t: visited.append(int(t[0])), t)
    return jnp.zeros_like(x)

  sampler = sampling.Sampler(method, 6, eta=1.0 if method == 'euler_a' else 0.0)
  jax.block_until_ready(jax.jit(lambda r: sampling.sample(model_fn, LINEAR, sampler, r, (2, 4, 4, 1)))(
      jax.random.key(0)))
  assert len(visited) == calls == sampler.model_calls(1000)
  ab = KD['alphas_cumprod']
  trained = np.sqrt((1 - ab) / ab)  # float64, increasing in t.
  levels = (trained[-1] ** (1 / 7) + np.linspace(0, 1, 6) * (trained[0] ** (1 / 7) - trained[-1] ** (1 / 7))) ** 7
  nearest = np.abs(np.log(levels)[:, None] - np.log(trained)).argmin(axis=1)
  if method == 'heun':  # Two calls a step, at sigma_i and at sigma_{i+1}, one on the last.
    nearest = np.append(np.stack([nearest[:-1], nearest[1:]], 1).ravel(), nearest[-1])
  assert visited == list(nearest)


@pytest.mark.parametrize('kwargs, message', [
    (dict(method='dpm_2'), r"Unknown sampler 'dpm_2'; choose one of .*'euler', 'euler_a', 'heun'"),
    (dict(method='heun', sigma_schedule='exponential'), r"Unknown sigma schedule 'exponential'; choose one of"),
    (dict(method='euler', rho=0.0), r'sampling.rho must be > 0 \(Karras et al. use 7\), got 0.0'),
    (dict(method='euler', rho=float('nan')), r'sampling.rho must be > 0 .*got nan'),
    (dict(method='heun', s_churn=-1.0), r'sampling.s_churn must be >= 0, got -1.0'),
    (dict(method='heun', s_noise=-0.5), r'sampling.s_noise must be >= 0, got -0.5'),
    (dict(method='heun', s_tmin=-1.0), r'sampling.s_tmin must be >= 0, got -1.0'),
    (dict(method='heun', s_churn=1.0, s_tmin=2.0, s_tmax=1.0), r's_tmax=1.0 is below sampling.s_tmin=2.0'),
    (dict(method='ddim', s_churn=1.0), r's_churn=1.0 is EDM churn of the euler and heun samplers, not of ddim'),
    (dict(method='euler_a', eta=1.0, s_churn=1.0), r'not of euler_a: set sampling.s_churn=0'),
    (dict(method='heun', eta=1.0), r'The heun sampler takes no eta but sampling.eta=1.0: set sampling.eta=0'),
    (dict(method='euler', num_steps=0), r'num_steps must be an integer in \[1, T=1000\], got 0'),
])
def test_bad_karras_settings(kwargs, message):
  with pytest.raises(ValueError, match=message) as error:
    sampling.Sampler(**kwargs).check(1000)
  assert '\n' not in str(error.value)


def test_config_errors_come_before_any_compile():
  config = tiny_config()
  config.sampling.method = 'heun'  # The demo's eta = 1 is DDIM's.
  with pytest.raises(ValueError, match=r'heun sampler takes no eta but sampling.eta=1.0'):
    experiment.check_config(config, 1)
  config.sampling.eta, config.sampling.rho = 0.0, -7.0
  with pytest.raises(ValueError, match=r'sampling.rho must be > 0 .*got -7.0'):
    experiment.build(config)
  with pytest.raises(ValueError, match=r'steps over noise levels'):
    sampling.Sampler('heun', 10).timesteps(1000)


def test_heun_on_the_tiny_model_ends_with_an_euler_step_to_the_clipped_denoiser():
  """experiment.sample_fn with method=heun on configs/tiny.py (untrained U-Net): the recorded chain, and the sample is
  the clipped D of the last state (an Euler step to sigma = 0) evaluated with the model directly."""
  config = tiny_config()
  config.sampling.method, config.sampling.eta, config.sampling.num_steps = 'heun', 0.0, 3
  exp = experiment.build(config)
  params = exp.init_params(jax.random.key(0))
  chain = np.asarray(exp.sample_fn(record_every=1)(params, jax.random.key(1), 0))
  assert chain.shape == (4, 4, 8, 8, 1) and np.isfinite(chain).all()
  sigma = karras.schedule_sigmas(exp.schedule, 3, 7.0)[2]
  model_fn = lambda x, t: exp.model.apply({'params': params}, x, t, None, train=False)
  last = karras.denoise(model_fn, exp.schedule, chain[2] * jnp.sqrt(1 + sigma**2), sigma, clip_x0=True,
                        parameterization='eps')
  np.testing.assert_allclose(chain[-1], last, atol=1e-5)
  assert np.abs(chain[-1]).max() <= 1 + 1e-6 and np.abs(chain[-1]).max() > 0.5
