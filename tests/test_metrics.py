"""FID and Inception Score: closed forms, an independent Fréchet distance, streaming statistics, stats files."""
import numpy as np
import pytest

from diffusion_jax import metrics


def random_covariance(rng, dim, rank=None):
  a = rng.standard_normal((dim, rank or 2 * dim))
  return a @ a.T / a.shape[1]


def psd_sqrt(matrix):
  values, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_by_eigh(mu1, sigma1, mu2, sigma2):
  """Tr sqrt(S1 S2) = sum of sqrt(eigenvalues of the symmetric sqrt(S1) S2 sqrt(S1)), with numpy's eigh only."""
  root = psd_sqrt(sigma1)
  eigenvalues = np.linalg.eigvalsh(root @ sigma2 @ root)
  trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
  return np.sum((mu1 - mu2)**2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt


@pytest.mark.parametrize('dim', [3, 64])
def test_frechet_distance_equals_an_eigh_computation(dim):
  rng = np.random.default_rng(dim)
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  sigma1, sigma2 = random_covariance(rng, dim), random_covariance(rng, dim)
  expected = frechet_distance_by_eigh(mu1, sigma1, mu2, sigma2)
  assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_closed_form_for_diagonal_covariances():
  """Commuting covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2."""
  rng = np.random.default_rng(0)
  a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
  mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_a_set_against_itself_is_zero():
  features = np.random.default_rng(1).standard_normal((500, 32)) * 3 + 1
  mu, sigma = metrics.activation_statistics(features)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
  assert metrics.frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(32, rel=1e-8)


def test_frechet_distance_of_rank_deficient_covariances():
  """Fewer samples than dimensions (singular covariances, as 2048-d features of < 2049 images) stay finite."""
  rng = np.random.default_rng(2)
  a, b = rng.standard_normal((20, 50)), rng.standard_normal((20, 50)) + 0.5
  mu1, sigma1 = metrics.activation_statistics(a)
  mu2, sigma2 = metrics.activation_statistics(b)
  expected = frechet_distance_by_eigh(mu1, sigma1, mu2, sigma2)
  assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-4)


def test_frechet_distance_errors():
  eye = np.eye(3)
  with pytest.raises(ValueError, match=r'expected mu \(D,\) and sigma \(D, D\), got \(3,\) and \(2, 2\)'):
    metrics.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)
  with pytest.raises(ValueError, match='different dimensions: 3 and 4'):
    metrics.frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match='imaginary component.*not positive semi-definite'):
    metrics.frechet_distance(np.zeros(3), eye, np.zeros(3), -eye)


def test_activation_statistics_are_float64_mean_and_unbiased_covariance():
  features = np.random.default_rng(3).standard_normal((100, 5)).astype(np.float32)
  mu, sigma = metrics.activation_statistics(features)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (5, 5)
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
  centred = features.astype(np.float64) - mu
  np.testing.assert_allclose(sigma, centred.T @ centred / 99, rtol=1e-12)
  with pytest.raises(ValueError, match='at least 2 feature vectors'):
    metrics.activation_statistics(features[:1])
  with pytest.raises(ValueError, match=r'expected an array \(N, D\), got shape \(100,\)'):
    metrics.activation_statistics(features[:, 0])


def test_streaming_statistics_equal_one_shot():
  """Batches of uneven sizes, features far from zero (as sums of outer products would lose them)."""
  features = np.random.default_rng(4).standard_normal((1000, 16)) * 0.01 + 1000
  accumulator = metrics.StatisticsAccumulator()
  for batch in np.split(features, [1, 300, 301, 777]):
    accumulator.update(batch.astype(np.float32))
  mu, sigma = metrics.activation_statistics(features.astype(np.float32))
  stream_mu, stream_sigma = accumulator.statistics()
  assert accumulator.count == 1000
  np.testing.assert_allclose(stream_mu, mu, rtol=1e-12)
  np.testing.assert_allclose(stream_sigma, sigma, rtol=1e-8, atol=1e-12 * np.abs(sigma).max())
  with pytest.raises(ValueError, match='dimension 8 fed to an accumulator of dimension 16'):
    accumulator.update(np.zeros((2, 8)))
  with pytest.raises(ValueError, match='at least 2 feature vectors for a covariance, got 0'):
    metrics.StatisticsAccumulator().statistics()


def test_inception_score_of_uniform_predictions_is_one():
  mean, std = metrics.inception_score(np.zeros((100, 1008)))
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize('num_classes', [2, 10, 1008])
def test_inception_score_of_confident_even_predictions_is_the_class_count(num_classes):
  """One-hot p(y|x), each class equally often in every split: KL = log K."""
  logits = 100.0 * np.eye(num_classes)[np.arange(10 * num_classes) % num_classes]
  mean, std = metrics.inception_score(logits, num_splits=10)
  assert mean == pytest.approx(num_classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_equals_the_reference_formula():
  """Salimans et al.'s code: softmax, per split exp(mean sum p (log p - log mean p)); splits of 7 and 8 rows."""
  logits = np.random.default_rng(5).standard_normal((29, 6)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for i in range(4):
    part = p[i * 29 // 4:(i + 1) * 29 // 4]
    scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1))))
  assert metrics.inception_score(logits, num_splits=4) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
  with pytest.raises(ValueError, match=r'num_splits must be in \[1, N = 29\], got 30'):
    metrics.inception_score(logits, num_splits=30)


def test_statistics_file_round_trip(tmp_path):
  mu, sigma = metrics.activation_statistics(np.random.default_rng(6).standard_normal((50, 4)))
  path = str(tmp_path / 'cifar10_train')  # No .npz suffix: the name is kept as given.
  metrics.save_statistics(path, mu, sigma, num_images=50, dataset='cifar10/train', features='inception/pool3')
  stats = metrics.load_statistics(path, features='inception/pool3')
  np.testing.assert_array_equal(stats.mu, mu)
  np.testing.assert_array_equal(stats.sigma, sigma)
  assert (stats.num_images, stats.dataset, stats.features) == (50, 'cifar10/train', 'inception/pool3')
  with pytest.raises(ValueError, match=r"statistics of 'inception/pool3' features, not of 'mnist_classifier'"):
    metrics.load_statistics(path, features='mnist_classifier')


def test_pytorch_fid_statistics_files_load_without_metadata(tmp_path):
  np.savez(tmp_path / 'fid_stats.npz', mu=np.zeros(3, np.float32), sigma=np.eye(3, dtype=np.float32))
  stats = metrics.load_statistics(str(tmp_path / 'fid_stats.npz'))
  assert stats.mu.dtype == np.float64 and (stats.num_images, stats.dataset, stats.features) == (None, None, None)


def test_statistics_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.npz not found; compute them with activation_statistics'):
    metrics.load_statistics(str(tmp_path / 'missing.npz'))
  (tmp_path / 'text.npz').write_text('not an npz')
  with pytest.raises(ValueError, match='Cannot read .*text.npz as a .npz of arrays'):
    metrics.load_statistics(str(tmp_path / 'text.npz'))
  np.savez(tmp_path / 'other.npz', mean=np.zeros(3))
  with pytest.raises(ValueError, match=r"holds \['mean'\], not the arrays mu and sigma"):
    metrics.load_statistics(str(tmp_path / 'other.npz'))
  np.savez(tmp_path / 'shapes.npz', mu=np.zeros(3), sigma=np.eye(4))
  with pytest.raises(ValueError, match=r'shapes.npz: expected mu \(D,\) and sigma \(D, D\)'):
    metrics.load_statistics(str(tmp_path / 'shapes.npz'))
  with pytest.raises(ValueError, match='mu or sigma is not finite'):
    metrics.save_statistics(str(tmp_path / 'nan.npz'), np.full(2, np.nan), np.eye(2), 2, 'x', 'y')
