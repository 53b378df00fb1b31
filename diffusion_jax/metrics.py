"""FID and Inception Score from features and logits of any network (NumPy / SciPy, float64).

FID (Heusel et al., 2017) is the Fréchet distance between Gaussians fitted to the features (N, D) of two image
sets; the Inception Score (Salimans et al., 2016) is exp E_x KL(p(y|x) || p(y)) over softmax(logits). Both follow
pytorch-fid / the TTUR and OpenAI reference code. Nothing here knows the feature extractor: reference statistics
files record which one they came from.
"""
import os
import warnings
from typing import NamedTuple, Optional

import numpy as np
import scipy.linalg
from scipy.special import log_softmax

from diffusion_jax import files
from diffusion_jax.checks import ConfigError, MissingFileError


def check_statistics(mu: np.ndarray, sigma: np.ndarray, what: str = 'statistics') -> None:
  """Raises a ValueError unless mu is (D,) and sigma (D, D), both finite."""
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ConfigError(f'{what}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}.')
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ConfigError(f'{what}: mu or sigma is not finite.')


def as_features(features, what: str = 'features') -> np.ndarray:
  """features as a float64 (N, D) array; a ValueError for another rank or non-finite values."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ConfigError(f'{what}: expected an array (N, D), got shape {features.shape}.')
  if not np.isfinite(features).all():
    raise ConfigError(f'{what}: contains NaN or infinite values.')
  return features


def activation_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D) with N >= 2 (as np.cov)."""
  features = as_features(features)
  if features.shape[0] < 2:
    raise ConfigError(f'Need at least 2 feature vectors for a covariance, got {features.shape[0]}.')
  return features.mean(axis=0), np.cov(features, rowvar=False)


class StatisticsAccumulator:
  """Mean and covariance of features fed batch by batch (e.g. 50k samples), equal to `activation_statistics`.

  Keeps the count, the sum and the sum of outer products in float64, taken about the first batch's mean so that
  features far from zero lose no precision.
  """

  def __init__(self):
    self.count = 0
    self._shift = self._sum = self._outer = None

  def update(self, features) -> None:
    """Adds features (N, D); D must stay the same from batch to batch."""
    features = as_features(features)
    if self._shift is None:
      self._shift = features.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((features.shape[1], features.shape[1]))
    elif features.shape[1] != self._shift.shape[0]:
      raise ConfigError(f'Features of dimension {features.shape[1]} fed to an accumulator of dimension '
                        f'{self._shift.shape[0]}.')
    centred = features - self._shift
    self.count += features.shape[0]
    self._sum += centred.sum(axis=0)
    self._outer += centred.T @ centred

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) of all features so far; needs at least 2."""
    if self.count < 2:
      raise ConfigError(f'Need at least 2 feature vectors for a covariance, got {self.count}.')
    mean = self._sum / self.count
    sigma = (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)
    return self._shift + mean, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)): the FID for Inception pool3 statistics.

  As pytorch-fid: if sqrtm(sigma1 sigma2) is not finite (singular product) it is retried with eps added to the
  diagonals; an imaginary part from rounding (diagonal |imag| <= 1e-3) is dropped, a larger one is an error.
  """
  mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
  check_statistics(mu1, sigma1, 'first statistics')
  check_statistics(mu2, sigma2, 'second statistics')
  if mu1.shape != mu2.shape:
    raise ConfigError(f'The statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}.')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)  # Singular products are handled below.
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      offset = eps * np.eye(mu1.shape[0])
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ConfigError(f'sqrtm(sigma1 @ sigma2) has an imaginary component of {np.abs(covmean.imag).max():.3g}: '
                        'the covariances are not positive semi-definite (or from far too few samples).')
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
  """(mean, std) over num_splits equal parts of exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits (N, K)).

  Splits are [i N / s, (i + 1) N / s) as in Salimans et al.'s code; for the Inception network pass its logits
  without the fc bias (`InceptionV3`'s output). The score lies in [1, K].
  """
  logits = as_features(logits, 'logits')
  if not 1 <= num_splits <= logits.shape[0]:
    raise ConfigError(f'num_splits must be in [1, N = {logits.shape[0]}], got {num_splits}.')
  n = logits.shape[0]
  scores = []
  for i in range(num_splits):
    log_p = log_softmax(logits[i * n // num_splits:(i + 1) * n // num_splits], axis=1)
    log_p_y = np.log(np.exp(log_p).mean(axis=0))
    scores.append(np.exp(np.mean(np.sum(np.exp(log_p) * (log_p - log_p_y), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


class ReferenceStatistics(NamedTuple):
  """Statistics of a reference image set; metadata fields are None in files without them (pytorch-fid's)."""
  mu: np.ndarray  # (D,) float64
  sigma: np.ndarray  # (D, D) float64
  num_images: Optional[int]
  dataset: Optional[str]
  features: Optional[str]  # The feature extractor, e.g. 'inception-2015-12-05/pool3'.


def save_statistics(path: str, mu, sigma, num_images: int, dataset: str, features: str) -> None:
  """Writes mu (D,), sigma (D, D) and metadata to the .npz `path` (pytorch-fid reads its mu and sigma)."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  check_statistics(mu, sigma, f'statistics for {path}')
  with files.atomic_write(path) as f:  # A file object: np.savez would append '.npz' to other names.
    np.savez(f, mu=mu, sigma=sigma, num_images=np.int64(num_images), dataset=np.str_(dataset),
             features=np.str_(features))


def load_statistics(path: str, features: Optional[str] = None) -> ReferenceStatistics:
  """Reads a statistics .npz (this module's or pytorch-fid's: mu, sigma); checks its extractor if `features`."""
  if not os.path.exists(path):
    raise MissingFileError(f'Reference statistics {path} not found; compute them with activation_statistics '
                           f'(or StatisticsAccumulator) and save_statistics.')
  try:
    with np.load(path) as data:
      contents = {key: data[key] for key in data.files}
  except Exception as e:
    raise ConfigError(f'Cannot read {path} as a .npz of arrays ({e}).') from e
  if 'mu' not in contents or 'sigma' not in contents:
    raise ConfigError(f'{path} holds {sorted(contents)}, not the arrays mu and sigma of reference statistics.')
  mu, sigma = contents['mu'].astype(np.float64), contents['sigma'].astype(np.float64)
  check_statistics(mu, sigma, path)
  stats = ReferenceStatistics(mu, sigma, int(contents['num_images']) if 'num_images' in contents else None,
                              str(contents['dataset']) if 'dataset' in contents else None,
                              str(contents['features']) if 'features' in contents else None)
  if features is not None and stats.features != features:
    raise ConfigError(f'{path} holds statistics of {stats.features!r} features, not of {features!r}.')
  return stats
