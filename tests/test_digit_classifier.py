"""The digit classifier: held-out accuracy, FID ranking real < blurred < noise, cache, label accuracy, bad input.

The classifier is trained once (DEFAULT_STEPS, about 30 s on 2 CPU cores) into a temporary cache directory.
"""
import numpy as np
import pytest
import scipy.ndimage

from diffusion_jax import digit_classifier

pytestmark = pytest.mark.slow  # The classifier is trained first (~25 s).


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('classifier_cache'))


@pytest.fixture(scope='module')
def classifier(cache_dir):
  return digit_classifier.load_or_train_classifier(cache_dir)


@pytest.fixture(scope='module')
def splits():
  return digit_classifier.digit_splits()


def blur(images, sigma):
  """Gaussian blur of uint8 images (N, H, W, 1) over H and W."""
  blurred = scipy.ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma, 0))
  return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


def test_split_is_fixed_stratified_and_disjoint(splits):
  (train_images, train_labels), (held_images, held_labels) = splits['train'], splits['held_out']
  assert train_images.shape == (4000, 28, 28, 1) and held_images.shape == (1000, 28, 28, 1)
  assert np.array_equal(np.bincount(held_labels), np.full(10, 100))
  train_rows = {image.tobytes() for image in train_images}
  assert sum(image.tobytes() in train_rows for image in held_images) <= 5  # MNIST holds a few duplicates at most.
  images, labels = digit_classifier.held_out_digits()
  assert np.array_equal(images, held_images) and np.array_equal(labels, held_labels)


def test_held_out_accuracy(classifier, splits):
  """Measured: 0.983 (seed 0, 800 steps); 0.982 for seeds 1 and 2."""
  assert classifier.held_out_accuracy >= 0.95
  images, labels = splits['held_out']
  assert np.mean(digit_classifier.predict(classifier, images) == labels) == classifier.held_out_accuracy


def test_fid_ranks_real_below_blurred_below_noise(classifier, splits):
  """Measured FIDs: real 5.5, blurred 220, noise 1260; confident shares 0.97, 0.60, 0.0."""
  reference = splits['held_out'][0]
  real = splits['train'][0][np.random.default_rng(0).permutation(4000)[:1000]]  # The digits are sorted by class.
  noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
  results = {name: digit_classifier.digit_metrics(classifier, images, reference)
             for name, images in [('real', real), ('blurred', blur(real, 1.5)), ('noise', noise)]}
  fids = {name: result['classifier_fid'] for name, result in results.items()}
  assert fids['real'] < fids['blurred'] < fids['noise'], fids
  assert fids['blurred'] > 3 * fids['real'], fids
  assert results['real']['confident_share'] > 0.9 and results['noise']['confident_share'] < 0.1
  assert results['real']['class_histogram'].sum() == 1000
  assert results['real']['class_entropy'] > 0.99 * np.log(10)
  assert results['noise']['class_entropy'] < 0.5 * np.log(10)
  assert 'accuracy_vs_labels' not in results['real']


def test_cache_round_trip(classifier, cache_dir, splits):
  loaded = digit_classifier.load_or_train_classifier(cache_dir)
  assert loaded.held_out_accuracy == classifier.held_out_accuracy
  images = splits['held_out'][0][:600]  # Two batches, the second padded.
  for fresh, cached in zip(digit_classifier.features_and_logits(classifier, images),
                           digit_classifier.features_and_logits(loaded, images)):
    np.testing.assert_array_equal(fresh, cached)
  features, logits = digit_classifier.features_and_logits(classifier, images)
  assert features.shape == (600, digit_classifier.NUM_FEATURES) and logits.shape == (600, 10)


def test_load_rejects_another_version(classifier, tmp_path):
  path = str(tmp_path / 'old.npz')
  digit_classifier.save_classifier(path, classifier)
  with np.load(path) as data:
    contents = dict(data)
  np.savez(path, **{**contents, 'version': np.str_('digit-cnn-v0')})
  with pytest.raises(ValueError, match='version'):
    digit_classifier.load_classifier(path)


def test_accuracy_vs_labels(classifier, splits):
  images, labels = splits['held_out']
  result = digit_classifier.digit_metrics(classifier, images, splits['train'][0][:1000], labels=labels)
  assert result['accuracy_vs_labels'] == classifier.held_out_accuracy
  shuffled = np.random.default_rng(0).permutation(labels)
  result = digit_classifier.digit_metrics(classifier, images, splits['train'][0][:1000], labels=shuffled)
  assert result['accuracy_vs_labels'] == pytest.approx(0.1, abs=0.04)
  with pytest.raises(ValueError, match='one per sample'):
    digit_classifier.digit_metrics(classifier, images, images, labels=labels[:10])


@pytest.mark.parametrize('images', [
    np.zeros((4, 32, 32, 3), np.uint8),  # CIFAR-like samples.
    np.zeros((4, 28, 28, 1), np.float32),  # Floats in [-1, 1] instead of uint8.
    np.zeros((28, 28, 1), np.uint8),  # A single image without the batch axis.
])
def test_bad_input_is_a_clear_error(classifier, splits, images):
  with pytest.raises(ValueError, match=r'uint8 images of shape \(N, 28, 28, 1\)'):
    digit_classifier.features_and_logits(classifier, images)
  with pytest.raises(ValueError, match=r'^samples: .* got'):
    digit_classifier.digit_metrics(classifier, images, splits['held_out'][0])
