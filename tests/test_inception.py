"""The FID Inception: pytorch-fid's parameter count, parity with pytorch-fid on seeded random weights, errors."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from diffusion_jax.models import inception

# tests/fixtures/make_inception_fixture.py ran pytorch-fid 0.3.0 on these weights (NumPy only, seeded per key).
_spec = importlib.util.spec_from_file_location('inception_random_weights',
                                               os.path.join(FIXTURES, 'inception_random_weights.py'))
random_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(random_weights)


@pytest.fixture(scope='module')
def reference():
  with open(os.path.join(FIXTURES, 'inception_random.json')) as f:
    meta = json.load(f)
  state_dict = random_weights.random_state_dict(meta['state_dict_shapes'], meta['seed'])
  return meta, state_dict, np.load(os.path.join(FIXTURES, 'inception_random_io.npz'))


def test_parameter_count_equals_pytorch_fid(reference):
  """torchvision's Inception3 without the aux head, fc 2048 -> 1008: 23,850,960 (torch's count in the fixture)."""
  meta, _, _ = reference
  shapes = jax.eval_shape(lambda: inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 299, 299, 3))))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes['params']))
  assert count == meta['param_count'] == 23_850_960
  # BatchNorm running mean and variance: 2 x the 17,216 BatchNorm channels, buffers in torch.
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes['batch_stats'])) == 34_432


def test_parity_with_pytorch_fid(reference, tmp_path):
  """Same random weights, through a .npz as a user would: features and logits equal pytorch-fid's to 1e-5."""
  meta, state_dict, io = reference
  num_batches_tracked = {k.replace('running_mean', 'num_batches_tracked'): np.int64(0)
                         for k in state_dict if k.endswith('running_mean')}
  np.savez(tmp_path / 'weights.npz', **state_dict, **num_batches_tracked)
  variables = inception.load_inception_params(str(tmp_path / 'weights.npz'))
  features, logits = jax.jit(inception.InceptionV3().apply)(variables, io['images'])
  assert features.shape == (2, inception.NUM_FEATURES) and logits.shape == (2, inception.NUM_CLASSES)
  for name, ours in (('features', features), ('logits', logits),
                     ('logits_with_bias', logits + variables['params']['fc']['bias'])):
    scale = np.abs(io[name]).max()
    np.testing.assert_allclose(ours, io[name], rtol=1e-5, atol=1e-5 * scale, err_msg=name)
  assert np.abs(io['features']).max() > 1 and meta['features_std'] > 0.1  # Not trivially small.


@pytest.mark.parametrize('case', [0, 1])
def test_resize_equals_torch_bilinear(reference, case):
  """Both up- and downsampling, as F.interpolate(mode='bilinear', align_corners=False)."""
  _, _, io = reference
  x, expected = io[f'resize{case}_x'], io[f'resize{case}_out']
  np.testing.assert_allclose(inception.resize_bilinear(x, *expected.shape[1:3]), expected, atol=1e-3)


def test_preprocess_range_and_grayscale():
  gray = jnp.linspace(0, 255, 2 * 8 * 8).reshape(2, 8, 8, 1)
  x = inception.preprocess(gray)
  assert x.shape == (2, 299, 299, 3)
  np.testing.assert_array_equal(x, inception.preprocess(jnp.repeat(gray, 3, axis=-1)))
  assert -1 - 1e-6 <= float(x.min()) and float(x.max()) <= 1 + 1e-6
  np.testing.assert_allclose(inception.preprocess(jnp.full((1, 5, 5, 3), 255.0)), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match=r'\(N, H, W, 1\) or \(N, H, W, 3\), got \(2, 8, 8, 4\)'):
    inception.grayscale_to_rgb(jnp.zeros((2, 8, 8, 4)))


def test_bad_state_dicts(reference):
  """Every problem is listed at once: a missing key, a wrong shape, an unexpected key."""
  _, state_dict, _ = reference
  bad = dict(state_dict)
  del bad['Mixed_7c.branch_pool.bn.running_var']
  bad['fc.weight'] = np.zeros((1000, 2048), np.float32)
  bad['AuxLogits.fc.weight'] = np.zeros((1008, 768), np.float32)
  message = (r"Shape mismatch for 'fc.weight': got \(1000, 2048\), the FID Inception has \(1008, 2048\).\n"
             r"  Missing 1 key\(s\): \['Mixed_7c.branch_pool.bn.running_var'\].\n"
             r"  Unexpected key\(s\) \['AuxLogits.fc.weight'\]")
  with pytest.raises(ValueError, match=message):
    inception.inception_params_from_torch_state_dict(bad)


def test_weight_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'missing.npz not found. Download pytorch-fid\'s weights from https'):
    inception.load_inception_params(str(tmp_path / 'missing.npz'))
  (tmp_path / 'weights.pth').write_bytes(b'torch')
  with pytest.raises(ValueError, match='is a torch checkpoint; .* save them as a .npz'):
    inception.load_inception_params(str(tmp_path / 'weights.pth'))
  (tmp_path / 'weights.npz').write_text('not an npz')
  with pytest.raises(ValueError, match='Cannot read .*weights.npz as a .npz of arrays'):
    inception.load_inception_params(str(tmp_path / 'weights.npz'))
