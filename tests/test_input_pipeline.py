"""Input pipeline: every source (embedded digits, TFDS configs under mock_data, image folders), the
deterministic resumable stream, host sharding, flips, value ranges and clear errors for bad input."""
import os
import shutil
import sys
import time

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import celeba64, celebahq256, cifar10, default, fashion_mnist, lsun256, mnist
from diffusion_jax import datasets, input_pipeline, train
from diffusion_jax.images import to_float, to_uint8


@pytest.fixture(scope='module')
def digits():
  return datasets.load_embedded_digits()


def small(data, n=40):
  return datasets.ImageData(data.images[::len(data) // n][:n], data.labels[::len(data) // n][:n], 'small')


def take(data, steps, global_batch, seed=0, **kwargs):
  """The first `steps` batches of a fresh iterator (freed on return)."""
  batches = input_pipeline.create_iterator(data, global_batch, seed, **kwargs)
  return [next(batches) for _ in range(steps)]


def all_images(data):
  """Every image of a dataset as uint8 (N, H, W, C), in index order."""
  if isinstance(data, datasets.ImageData):
    return data.images
  return np.stack([datasets.decode_image(data.source[i]['image'], data.image_size, data.channels)
                   for i in range(len(data))])


def data_config(**kwargs):
  return ml_collections.ConfigDict({**default.get_config().data.to_dict(), **kwargs})


def test_embedded_digits(digits):
  assert digits.images.shape == (5000, 28, 28, 1) and digits.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(digits.labels), [500] * 10)
  assert digits.images.max() == 255 and digits.images.min() == 0
  assert 0.08 < (digits.images > 127).mean() < 0.2  # MNIST-like ink coverage, white on black.
  assert digits.num_classes == 10


def test_batches_shape_dtype_range(digits):
  batch = take(digits, 1, 16)[0]
  assert batch['image'].shape == (16, 28, 28, 1) and batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
  # The value map is uint8 / 127.5 - 1: the batch maps back onto dataset images of its labels.
  first = to_uint8(batch['image'][0]).reshape(-1)
  matches = np.flatnonzero((digits.images.reshape(5000, -1) == first).all(1))
  assert len(matches) >= 1 and digits.labels[matches[0]] == batch['label'][0]


def test_every_epoch_is_a_permutation_and_resume_continues_the_stream(digits):
  data = small(digits)
  batches = take(data, 10, 8, seed=3, random_flip=True)  # 2 epochs of 40.
  labels = np.concatenate([b['label'] for b in batches])
  for epoch in (labels[:40], labels[40:]):
    np.testing.assert_array_equal(np.sort(epoch), np.sort(data.labels))
  assert not np.array_equal(labels[:40], labels[40:])  # A fresh order each epoch.
  resumed = take(data, 1, 8, seed=3, start_step=7, random_flip=True)[0]
  np.testing.assert_array_equal(resumed['image'], batches[7]['image'])  # Same examples, same flips.
  again = take(data, 3, 8, seed=3, random_flip=True)
  for a, b in zip(again, batches):
    np.testing.assert_array_equal(a['image'], b['image'])
  other_seed = take(data, 1, 8, seed=4)[0]
  assert not np.array_equal(other_seed['label'], batches[0]['label'])


def test_hosts_read_their_slices_of_the_global_batch(digits):
  data = small(digits)
  global_batch = take(data, 1, 8, seed=1, start_step=2)[0]['image']
  parts = [take(data, 1, 8, seed=1, start_step=2, process_index=i, process_count=4)[0]['image'] for i in range(4)]
  assert all(p.shape == (2, 28, 28, 1) for p in parts)
  np.testing.assert_array_equal(np.concatenate(parts), global_batch)
  with pytest.raises(ValueError, match='batch size 8 is not divisible by the 3 processes'):
    input_pipeline.create_iterator(data, 8, seed=1, process_count=3)


def check_hosts_split_an_epoch(data, global_batch):
  """Two hosts' batches of one epoch are disjoint and together hold every image once."""
  steps = len(data) // global_batch
  assert steps * global_batch == len(data)
  hosts = [np.concatenate([b['image'] for b in take(data, steps, global_batch, seed=5, process_index=i,
                                                    process_count=2)]) for i in range(2)]
  keys = [{to_uint8(x).tobytes() for x in images} for images in hosts]
  assert [len(k) for k in keys] == [len(data) // 2] * 2
  assert not keys[0] & keys[1]
  assert keys[0] | keys[1] == {x.tobytes() for x in all_images(data)}


def test_two_hosts_split_the_data(digits):
  check_hosts_split_an_epoch(small(digits), 8)


def test_random_flip(digits):
  data = small(digits)
  plain = take(data, 1, 40)[0]['image']
  flipped = take(data, 1, 40, random_flip=True)[0]['image']
  same = [np.array_equal(a, b) for a, b in zip(plain, flipped)]
  mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(plain, flipped)]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 8 <= sum(mirrored) <= 32  # About half, with a fixed seed.
  again = take(data, 1, 40, random_flip=True)[0]['image']
  np.testing.assert_array_equal(again, flipped)  # Flips are seeded, not stateful.


def test_resize_images_crops_the_central_square():
  images = np.zeros((1, 6, 10, 1), np.uint8)
  images[0, :, 2:8] = 200  # The central 6x6 square is 200, outside it is 0.
  out = datasets.resize_images(images, 3)
  assert out.shape == (1, 3, 3, 1)
  np.testing.assert_array_equal(out[0, :, :, 0], 200)
  faces = np.zeros((2, 218, 178, 3), np.uint8)
  faces[:, 57:185, 25:153] = 90  # DDIM's CelebA box.
  np.testing.assert_array_equal(datasets.resize_images(faces, 64, datasets.CELEBA_BOX), 90)


def test_uint8_round_trip():
  x = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(to_uint8(np.asarray(to_float(x))), x)


def test_unknown_dataset():
  with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'; choose one of \['celeba', 'celebahq', 'cifar10', "
                                       r"'digits', 'fashion_mnist', 'folder', 'lsun/CATEGORY', 'mnist'\] \(LSUN "
                                       r'categories: airplane, bedroom'):
    datasets.load_dataset(data_config(dataset='imagenet'))
  with pytest.raises(ValueError, match=r"Unknown dataset 'lsun/beach'"):
    datasets.check_dataset_name('lsun/beach')


@pytest.mark.parametrize('size', [0, -3, 2.5, '32', True, None])
def test_image_size_must_be_a_positive_integer(size):
  with pytest.raises(ValueError, match=r'data.image_size must be a positive integer, got '):
    datasets.load_dataset(data_config(dataset='folder', folder='/nonexistent', image_size=size))


def test_channels_must_be_1_or_3_and_match_a_tfds_dataset():
  with pytest.raises(ValueError, match=r'data.channels must be 1 \(grayscale\) or 3 \(RGB\), got 2'):
    datasets.load_dataset(data_config(channels=2))
  with pytest.raises(ValueError, match=r"Dataset 'mnist' has 1 channels but data.channels=3"):
    datasets.load_dataset(data_config(dataset='mnist', channels=3))


@pytest.mark.parametrize('dataset, message', [
    ('cifar10', r"'cifar10' is not prepared in .*tfds build cifar10 --data_dir=DIR"),
    ('lsun/bedroom', r"'lsun/bedroom' is not prepared in .*tfds build lsun/bedroom --file_format=array_record"),
    ('celebahq', r"'celeb_a_hq/256' is not prepared in .* It needs a manual download first, passed with "
                 r'--manual_dir: manual_dir should contain'),
])
def test_unprepared_tfds_dataset_fails_fast_with_instructions(dataset, message, tmp_path):
  start = time.time()
  with pytest.raises(datasets.DatasetError, match=message):
    datasets.load_dataset(data_config(dataset=dataset, image_size=32, channels=3, data_dir=str(tmp_path),
                                      download=False))
  assert time.time() - start < 30


@pytest.mark.parametrize('dataset, module, message', [
    ('cifar10', 'tensorflow_datasets', r"data.dataset='cifar10' needs TensorFlow Datasets, which is not installed: "
                                       r"pip install -e '.\[tfds\]'"),
    ('folder', 'tensorflow', r"data.dataset='folder' .* needs TensorFlow, which is not installed"),
])
def test_dataset_without_its_tensorflow_says_which_extra_to_install(dataset, module, message, monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, module, None)  # As if not installed: find_spec answers None.
  with pytest.raises(datasets.DatasetError, match=message):
    datasets.load_dataset(data_config(dataset=dataset, image_size=32, channels=3, folder=str(tmp_path)))


def test_random_access_dataset_stored_as_tfrecord_says_how_to_convert_it(tmp_path):
  builder = tfds.builder('lsun/bedroom', data_dir=str(tmp_path))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)  # "Prepared" as tfrecord, the default format.
  with pytest.raises(datasets.DatasetError, match=r"'lsun/bedroom' in .* is not stored as array_record.*"
                                                  r'tfds convert_format --dataset_version_dir='):
    datasets.load_dataset(data_config(dataset='lsun/bedroom', image_size=32, channels=3,
                                      data_dir=str(tmp_path), download=False))


@pytest.fixture
def mock_tfds(monkeypatch):
  """TFDS datasets of 16 random examples; "downloading" them is a no-op."""
  monkeypatch.setattr(datasets, 'network_reachable', lambda: True)
  with tfds.testing.mock_data(num_examples=16):
    yield


@pytest.mark.parametrize('config_module, num_classes', [
    (mnist, 10), (fashion_mnist, 10), (cifar10, 10), (celeba64, 0), (celebahq256, 0), (lsun256, 0)],
    ids=['mnist', 'fashion_mnist', 'cifar10', 'celeba64', 'celebahq256', 'lsun256'])
def test_every_tfds_config_loads_under_mock_data(config_module, num_classes, mock_tfds):
  config = config_module.get_config().data
  data = datasets.load_dataset(config)
  assert len(data) == 16 and data.num_classes == num_classes
  batches = take(data, 3, 8, random_flip=config.random_flip)  # Crosses an epoch boundary.
  size = config.image_size
  for batch in batches:
    assert batch['image'].shape == (8, size, size, config.channels) and batch['image'].dtype == np.float32
    assert -1.0 <= batch['image'].min() < batch['image'].max() <= 1.0
    np.testing.assert_array_equal(to_float(to_uint8(batch['image'])), batch['image'])
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
    assert batch['label'].min() >= 0 and batch['label'].max() < max(num_classes, 1)
  for a, b in zip(take(data, 3, 8, random_flip=config.random_flip), batches):  # Deterministic.
    np.testing.assert_array_equal(a['image'], b['image'])


def test_random_access_data_resumes_and_splits_over_hosts(mock_tfds):
  data = datasets.load_dataset(lsun256.get_config('bedroom').data)
  assert isinstance(data, datasets.RandomAccessData)
  data = datasets.RandomAccessData(data.source, data.name, 16, 3)  # Small images: a fast test.
  batches = take(data, 3, 8, seed=2, random_flip=True)
  resumed = take(data, 1, 8, seed=2, start_step=2, random_flip=True)[0]
  np.testing.assert_array_equal(resumed['image'], batches[2]['image'])
  check_hosts_split_an_epoch(data, 8)


def save(path, array, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """8 images of mixed sizes, modes and formats in 2 class subfolders (one nested), and files to leave out."""
  root = str(tmp_path_factory.mktemp('images'))
  rng = np.random.default_rng(0)
  noise = lambda h, w, *c: rng.integers(0, 256, (h, w, *c), np.uint8)
  wide = np.zeros((10, 30, 3), np.uint8)
  wide[:, 10:20] = 255  # Its central square is white.
  save(os.path.join(root, 'cats', 'a_wide.png'), wide)
  save(os.path.join(root, 'cats', 'b.png'), noise(20, 20, 3))
  save(os.path.join(root, 'cats', 'c_gray.png'), noise(15, 9))
  save(os.path.join(root, 'cats', 'd_alpha.png'), noise(12, 12, 4))
  save(os.path.join(root, 'dogs', 'a.jpg'), noise(24, 16, 3), quality=95)
  save(os.path.join(root, 'dogs', 'b.jpeg'), noise(11, 30, 3))
  save(os.path.join(root, 'dogs', 'puppies', 'c.JPG'), noise(40, 40, 3))
  save(os.path.join(root, 'dogs', 'puppies', 'd.png'), noise(8, 8, 3))
  with open(os.path.join(root, 'dogs', 'notes.txt'), 'w') as f:
    f.write('not an image')
  save(os.path.join(root, '.thumbnails', 'x.png'), noise(4, 4, 3))  # Hidden: left out.
  return root


def test_image_folder_loads_classes_at_the_configured_size(image_folder):
  data = datasets.load_dataset(data_config(dataset='folder', folder=image_folder, image_size=8, channels=3))
  assert data.images.shape == (8, 8, 8, 3) and data.images.dtype == np.uint8
  assert data.num_classes == 2
  np.testing.assert_array_equal(data.labels, [0, 0, 0, 0, 1, 1, 1, 1])  # cats, then dogs (paths sorted).
  np.testing.assert_array_equal(data.images[0], 255)  # cats/a_wide.png: its central square, resized.
  gray = datasets.load_dataset(data_config(dataset='folder', folder=image_folder, image_size=5, channels=1))
  assert gray.images.shape == (8, 5, 5, 1)
  unlabeled = datasets.load_dataset(data_config(dataset='folder', folder=os.path.join(image_folder, 'dogs'),
                                                image_size=8, channels=3, folder_labels=False))
  assert len(unlabeled) == 4 and unlabeled.num_classes == 0 and not unlabeled.labels.any()
  check_hosts_split_an_epoch(data, 4)


@pytest.mark.slow
def test_image_folder_trains(image_folder, tmp_path):
  from configs.tiny import get_config as tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  # Grayscale 8x8 as tiny_config: the programs of test_train.py, shared through the compilation cache.
  config.data.update(dict(dataset='folder', folder=image_folder))
  state = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
  assert int(state.step) == 3
  grid = np.asarray(Image.open(os.path.join(tmp_path, 'samples', 'ema_step_3.png')))
  assert grid.shape[:2] == (2 * 8 + 3 * 2, 3 * 8 + 4 * 2)  # 6 samples of 8x8: 2 rows of 3, 2px borders.


def test_image_folder_errors(image_folder, tmp_path):
  def load(folder, **kwargs):
    return datasets.load_dataset(data_config(dataset='folder', folder=folder, image_size=8, channels=3,
                                             **kwargs))

  with pytest.raises(datasets.DatasetError, match=r"data.dataset='folder' needs data.folder"):
    load(None)
  with pytest.raises(datasets.DatasetError, match=r"Image folder '.*nowhere' \(data.folder\) does not exist"):
    load(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.txt').write_text('no images')
  with pytest.raises(datasets.DatasetError, match=r'holds no PNG or JPEG files \(searched recursively; 1 other'):
    load(str(tmp_path / 'empty'))

  mixed = str(tmp_path / 'mixed')
  shutil.copytree(image_folder, mixed)
  shutil.copy(os.path.join(image_folder, 'cats', 'b.png'), os.path.join(mixed, 'top.png'))
  with pytest.raises(datasets.DatasetError, match=r"mixes image files at its top level \(e.g. 'top.png'\)"):
    load(mixed)
  assert len(load(mixed, folder_labels=False)) == 9

  corrupt = str(tmp_path / 'corrupt')
  shutil.copytree(image_folder, corrupt)
  with open(os.path.join(corrupt, 'cats', 'broken.png'), 'wb') as f:
    f.write(b'not a png')
  with open(os.path.join(image_folder, 'dogs', 'a.jpg'), 'rb') as src, \
      open(os.path.join(corrupt, 'dogs', 'truncated.jpg'), 'wb') as dst:
    dst.write(src.read()[:300])
  with pytest.raises(datasets.DatasetError,
                     match=r"2 of 10 files in image folder '.*corrupt' cannot be decoded: cats/broken.png "
                           r'\(UnidentifiedImageError: .*\); dogs/truncated.jpg \(OSError: .*\). Delete or repair'):
    load(corrupt)
