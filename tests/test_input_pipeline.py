"""Input pipeline: the embedded digits, a deterministic resumable stream, host sharding, flips, offline errors."""
import time

import ml_collections
import numpy as np
import pytest

from diffusion_jax import input_pipeline


@pytest.fixture(scope='module')
def digits():
  return input_pipeline.load_embedded_digits()


def small(data, n=40):
  return input_pipeline.ImageData(data.images[::len(data) // n][:n], data.labels[::len(data) // n][:n], 'small')


def test_embedded_digits(digits):
  assert digits.images.shape == (5000, 28, 28, 1) and digits.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(digits.labels), [500] * 10)
  assert digits.images.max() == 255 and digits.images.min() == 0
  assert 0.08 < (digits.images > 127).mean() < 0.2  # MNIST-like ink coverage, white on black.


def test_batches_shape_dtype_range(digits):
  batch = next(input_pipeline.create_iterator(digits, 16, seed=0))
  assert batch['image'].shape == (16, 28, 28, 1) and batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  assert batch['label'].shape == (16,)
  # The value map is uint8 / 127.5 - 1: the batch maps back onto dataset images of its labels.
  first = input_pipeline.to_uint8(batch['image'][0]).reshape(-1)
  matches = np.flatnonzero((digits.images.reshape(5000, -1) == first).all(1))
  assert len(matches) >= 1 and digits.labels[matches[0]] == batch['label'][0]


def test_every_epoch_is_a_permutation_and_resume_continues_the_stream(digits):
  data = small(digits)
  stream = input_pipeline.create_iterator(data, 8, seed=3)
  batches = [next(stream) for _ in range(10)]  # 2 epochs of 40.
  labels = np.concatenate([b['label'] for b in batches])
  for epoch in (labels[:40], labels[40:]):
    np.testing.assert_array_equal(np.sort(epoch), np.sort(data.labels))
  assert not np.array_equal(labels[:40], labels[40:])  # A fresh order each epoch.
  resumed = next(input_pipeline.create_iterator(data, 8, seed=3, start_step=7))
  np.testing.assert_array_equal(resumed['image'], batches[7]['image'])
  other_seed = next(input_pipeline.create_iterator(data, 8, seed=4))
  assert not np.array_equal(other_seed['label'], batches[0]['label'])


def test_hosts_read_their_slices_of_the_global_batch(digits):
  data = small(digits)
  global_batch = next(input_pipeline.create_iterator(data, 8, seed=1, start_step=2))['image']
  parts = [next(input_pipeline.create_iterator(data, 8, seed=1, start_step=2, process_index=i, process_count=4))
           ['image'] for i in range(4)]
  assert all(p.shape == (2, 28, 28, 1) for p in parts)
  np.testing.assert_array_equal(np.concatenate(parts), global_batch)
  with pytest.raises(ValueError, match='batch size 8 is not divisible by the 3 processes'):
    input_pipeline.create_iterator(data, 8, seed=1, process_count=3)


def test_random_flip(digits):
  data = small(digits)
  plain = next(input_pipeline.create_iterator(data, 40, seed=0))['image']
  flipped = next(input_pipeline.create_iterator(data, 40, seed=0, random_flip=True))['image']
  same = [np.array_equal(a, b) for a, b in zip(plain, flipped)]
  mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(plain, flipped)]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 8 <= sum(mirrored) <= 32  # About half, with a fixed seed.
  again = next(input_pipeline.create_iterator(data, 40, seed=0, random_flip=True))['image']
  np.testing.assert_array_equal(again, flipped)  # Flips are seeded, not stateful.


def test_center_crop_resize():
  images = np.zeros((1, 6, 10, 1), np.uint8)
  images[0, :, 2:8] = 200  # The central 6x6 square is 200, outside it is 0.
  out = input_pipeline.center_crop_resize(images, 3)
  assert out.shape == (1, 3, 3, 1)
  np.testing.assert_array_equal(out[0, :, :, 0], 200)


def test_uint8_round_trip():
  x = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(input_pipeline.to_uint8(np.asarray(input_pipeline.to_float(x))), x)


def test_unknown_dataset():
  config = ml_collections.ConfigDict(dict(dataset='imagenet', image_size=32, channels=3))
  with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'; choose one of \['celeba', 'cifar10', 'digits'"):
    input_pipeline.load_dataset(config)


def test_unprepared_tfds_dataset_fails_fast_with_instructions(tmp_path):
  config = ml_collections.ConfigDict(dict(dataset='cifar10', image_size=32, channels=3, data_dir=str(tmp_path),
                                          download=False))
  start = time.time()
  with pytest.raises(input_pipeline.DatasetError, match=r"'cifar10' is not prepared in .*tfds build cifar10"):
    input_pipeline.load_dataset(config)
  assert time.time() - start < 30
