"""The FID Inception network in Flax linen: the 2015-12-05 TF Inception graph of TTUR's FID and pytorch-fid.

A port of pytorch-fid's `fid_inception_v3` (torchvision's Inception3 with the FID graph's quirks: the average
pools of the A, C and first E blocks ignore the zero padding, the last E block max-pools, 1008 classes).
Layout is NHWC. `InceptionV3` maps float images (N, H, W, 3 or 1) in [0, 255] to
  features (N, 2048): the pool3 activations that FID compares, and
  logits (N, 1008): pool3 @ fc kernel, WITHOUT the fc bias, as in Salimans et al.'s Inception Score code (and
    guided-diffusion's evaluator); softmax(logits) is IS's p(y|x). pytorch-fid's full fc output is
    logits + variables['params']['fc']['bias'].
Inside, images are resized to 299x299 like pytorch-fid (bilinear, half-pixel centres, no antialiasing:
torch's F.interpolate(mode='bilinear', align_corners=False)) and scaled to [-1, 1]. BatchNorm uses the running
statistics only (eps 0.001).

The weights: pytorch-fid's port of the TF graph,
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
saved as a .npz of its arrays on any machine with torch:

  import numpy as np, torch
  state_dict = torch.load('pt_inception-2015-12-05-6726825d.pth', map_location='cpu')
  np.savez('pt_inception-2015-12-05.npz', **{k: v.numpy() for k, v in state_dict.items()})

then `variables = load_inception_params('pt_inception-2015-12-05.npz')` and
`features, logits = InceptionV3().apply(variables, images)`.
"""
import os
from typing import Any, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.checks import ConfigError, MissingFileError

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3
HOW_TO_CONVERT = ('Download pytorch-fid\'s weights from ' + FID_WEIGHTS_URL + ' and save them as a .npz of arrays '
                  'on a machine with torch (3 lines; see the docstring of diffusion_jax.models.inception).')

Padding = Union[int, tuple[int, int]]


def grayscale_to_rgb(images: jax.Array) -> jax.Array:
  """Images (N, H, W, 1) repeated to (N, H, W, 3), as FID implementations do for MNIST; RGB passes unchanged."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ConfigError(f'Expected images of shape (N, H, W, 1) or (N, H, W, 3), got {images.shape}.')
  return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def resize_bilinear(images: jax.Array, height: int, width: int) -> jax.Array:
  """(N, H, W, C) -> (N, height, width, C), as torch's F.interpolate(mode='bilinear', align_corners=False)."""
  shape = (images.shape[0], height, width, images.shape[-1])
  return jax.image.resize(images.astype(jnp.float32), shape, method='bilinear', antialias=False)


def preprocess(images: jax.Array) -> jax.Array:
  """Images (N, H, W, 1 or 3) in [0, 255] -> the network's input (N, 299, 299, 3) in [-1, 1]."""
  return resize_bilinear(grayscale_to_rgb(images), INPUT_SIZE, INPUT_SIZE) / 127.5 - 1.0


class BasicConv2d(nn.Module):
  """Conv without bias -> BatchNorm (running statistics, eps 0.001) -> ReLU; `padding` as torch's (symmetric)."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: Padding = 0
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    ph, pw = (self.padding, self.padding) if isinstance(self.padding, int) else self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=self.precision, name='conv')(x)
    return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name='bn')(x))


def avg_pool_3x3(x):
  """3x3 stride-1 average pool over the valid pixels only (TF's pool; torch's count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  """Mixed_5b/c/d (35x35): 1x1, 5x5, double 3x3 and average-pool branches."""
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda features, kernel, name, padding=0: BasicConv2d(features, kernel, padding=padding,
                                                                 precision=self.precision, name=name)
    branch1x1 = conv(64, (1, 1), 'branch1x1')(x)
    branch5x5 = conv(64, (5, 5), 'branch5x5_2', 2)(conv(48, (1, 1), 'branch5x5_1')(x))
    branch3x3dbl = conv(64, (1, 1), 'branch3x3dbl_1')(x)
    branch3x3dbl = conv(96, (3, 3), 'branch3x3dbl_3', 1)(conv(96, (3, 3), 'branch3x3dbl_2', 1)(branch3x3dbl))
    branch_pool = conv(self.pool_features, (1, 1), 'branch_pool')(avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: 35x35 -> 17x17 by a stride-2 3x3 conv, a double 3x3 and a max pool."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda features, kernel, name, strides=1, padding=0: BasicConv2d(
        features, kernel, strides, padding, precision=self.precision, name=name)
    branch3x3 = conv(384, (3, 3), 'branch3x3', 2)(x)
    branch3x3dbl = conv(96, (3, 3), 'branch3x3dbl_2', padding=1)(conv(64, (1, 1), 'branch3x3dbl_1')(x))
    branch3x3dbl = conv(96, (3, 3), 'branch3x3dbl_3', 2)(branch3x3dbl)
    branch_pool = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b/c/d/e (17x17): 1x1, factorised 7x7, double factorised 7x7 and average-pool branches."""
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda features, kernel, name, padding=0: BasicConv2d(features, kernel, padding=padding,
                                                                 precision=self.precision, name=name)
    c7 = self.channels_7x7
    branch1x1 = conv(192, (1, 1), 'branch1x1')(x)
    branch7x7 = conv(c7, (1, 1), 'branch7x7_1')(x)
    branch7x7 = conv(c7, (1, 7), 'branch7x7_2', (0, 3))(branch7x7)
    branch7x7 = conv(192, (7, 1), 'branch7x7_3', (3, 0))(branch7x7)
    branch7x7dbl = conv(c7, (1, 1), 'branch7x7dbl_1')(x)
    branch7x7dbl = conv(c7, (7, 1), 'branch7x7dbl_2', (3, 0))(branch7x7dbl)
    branch7x7dbl = conv(c7, (1, 7), 'branch7x7dbl_3', (0, 3))(branch7x7dbl)
    branch7x7dbl = conv(c7, (7, 1), 'branch7x7dbl_4', (3, 0))(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), 'branch7x7dbl_5', (0, 3))(branch7x7dbl)
    branch_pool = conv(192, (1, 1), 'branch_pool')(avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: 17x17 -> 8x8 by stride-2 convs after a 1x1 and a factorised 7x7, and a max pool."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda features, kernel, name, strides=1, padding=0: BasicConv2d(
        features, kernel, strides, padding, precision=self.precision, name=name)
    branch3x3 = conv(320, (3, 3), 'branch3x3_2', 2)(conv(192, (1, 1), 'branch3x3_1')(x))
    branch7x7x3 = conv(192, (1, 1), 'branch7x7x3_1')(x)
    branch7x7x3 = conv(192, (1, 7), 'branch7x7x3_2', padding=(0, 3))(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), 'branch7x7x3_3', padding=(3, 0))(branch7x7x3)
    branch7x7x3 = conv(192, (3, 3), 'branch7x7x3_4', 2)(branch7x7x3)
    branch_pool = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/c (8x8): 1x1, split 3x3, double split 3x3 and pool branches; Mixed_7c max-pools (FID graph quirk)."""
  max_pool: bool = False
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda features, kernel, name, padding=0: BasicConv2d(features, kernel, padding=padding,
                                                                 precision=self.precision, name=name)
    branch1x1 = conv(320, (1, 1), 'branch1x1')(x)
    branch3x3 = conv(384, (1, 1), 'branch3x3_1')(x)
    branch3x3 = jnp.concatenate([conv(384, (1, 3), 'branch3x3_2a', (0, 1))(branch3x3),
                                 conv(384, (3, 1), 'branch3x3_2b', (1, 0))(branch3x3)], axis=-1)
    branch3x3dbl = conv(384, (3, 3), 'branch3x3dbl_2', 1)(conv(448, (1, 1), 'branch3x3dbl_1')(x))
    branch3x3dbl = jnp.concatenate([conv(384, (1, 3), 'branch3x3dbl_3a', (0, 1))(branch3x3dbl),
                                    conv(384, (3, 1), 'branch3x3dbl_3b', (1, 0))(branch3x3dbl)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), padding=((1, 1), (1, 1)))
    else:
      pooled = avg_pool_3x3(x)
    branch_pool = conv(192, (1, 1), 'branch_pool')(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class Classifier(nn.Module):
  """The 1008-way fc layer: (N, 2048) -> logits (N, 1008) = x @ kernel; the bias is a parameter but unused."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
    self.param('bias', nn.initializers.zeros, (NUM_CLASSES,))
    return jnp.dot(x, kernel, precision=self.precision)


class InceptionV3(nn.Module):
  """pytorch-fid's FID Inception (23,850,960 parameters): images (N, H, W, 3 or 1) in [0, 255] -> (features, logits).

  features (N, 2048) are the pool3 activations (>= 0); logits (N, 1008) = features @ fc kernel, without the fc
  bias (the Inception Score convention). `precision` defaults to HIGHEST so that GPUs and TPUs compute the
  float32 convolutions in full float32 (not TF32 / bfloat16 passes) like the reference.
  """
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = preprocess(images)
    conv = lambda features, kernel, name, strides=1, padding=0: BasicConv2d(
        features, kernel, strides, padding, precision=self.precision, name=name)
    x = conv(32, (3, 3), 'Conv2d_1a_3x3', 2)(x)  # 149x149
    x = conv(32, (3, 3), 'Conv2d_2a_3x3')(x)  # 147x147
    x = conv(64, (3, 3), 'Conv2d_2b_3x3', padding=1)(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # 73x73
    x = conv(80, (1, 1), 'Conv2d_3b_1x1')(x)
    x = conv(192, (3, 3), 'Conv2d_4a_3x3')(x)  # 71x71
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # 35x35
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(pool_features, self.precision, name=name)(x)
    x = InceptionB(self.precision, name='Mixed_6a')(x)  # 17x17
    for name, channels_7x7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(channels_7x7, self.precision, name=name)(x)
    x = InceptionD(self.precision, name='Mixed_7a')(x)  # 8x8
    x = InceptionE(max_pool=False, precision=self.precision, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, precision=self.precision, name='Mixed_7c')(x)
    features = jnp.mean(x, axis=(1, 2))
    return features, Classifier(self.precision, name='fc')(features)


# Flax leaf -> the last part of the pytorch-fid state-dict key.
TORCH_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                    'var': 'running_var'}


def torch_shape(flax_shape: Sequence[int], leaf: str) -> tuple[int, ...]:
  """The torch shape of a Flax leaf: conv kernels HWIO -> OIHW, fc (in, out) -> (out, in)."""
  if leaf == 'kernel' and len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return o, i, h, w
  return tuple(flax_shape[::-1]) if leaf == 'kernel' else tuple(flax_shape)


def inception_params_from_torch_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
  """Variables {'params', 'batch_stats'} of `InceptionV3` from pytorch-fid's state dict (name -> array).

  Keys are those of pt_inception-2015-12-05-6726825d.pth ('Conv2d_1a_3x3.conv.weight', 'Mixed_5b.branch1x1.bn.
  running_mean', 'fc.weight', ...); 'num_batches_tracked' entries are ignored. Raises a ValueError listing
  missing keys, unexpected keys and shape mismatches.
  """
  expected = flax.traverse_util.flatten_dict(jax.eval_shape(
      lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))))
  keys = {path: '.'.join(path[1:-1] + (TORCH_LEAF_NAMES[path[-1]],)) for path in expected}
  converted, problems = {}, []
  for path, key in keys.items():
    if key not in state_dict:
      continue
    value, shape = np.asarray(state_dict[key], np.float32), torch_shape(expected[path].shape, path[-1])
    if value.shape != shape:
      problems.append(f'Shape mismatch for {key!r}: got {value.shape}, the FID Inception has {shape}.')
    elif path[-1] == 'kernel':
      converted[path] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    else:
      converted[path] = value
  missing = [key for key in keys.values() if key not in state_dict]
  if missing:
    problems.append(f'Missing {len(missing)} key(s): {missing[:8]}{" ..." if len(missing) > 8 else ""}.')
  known = set(keys.values())
  unexpected = [key for key in state_dict if key not in known and not key.endswith('num_batches_tracked')]
  if unexpected:
    problems.append(f'Unexpected key(s) {unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}.')
  if problems:
    raise ConfigError('Cannot convert the state dict into the FID Inception (expected the arrays of pytorch-fid\'s '
                      'pt_inception-2015-12-05-6726825d.pth):\n  ' + '\n  '.join(problems))
  return flax.traverse_util.unflatten_dict(converted)


def load_inception_params(path: str) -> dict[str, Any]:
  """Variables {'params', 'batch_stats'} of `InceptionV3` from a .npz of pytorch-fid's state dict."""
  if not os.path.exists(path):
    raise MissingFileError(f'FID Inception weights {path} not found. {HOW_TO_CONVERT}')
  if path.endswith('.pth'):
    raise ConfigError(f'{path} is a torch checkpoint; this project reads its arrays from a .npz. {HOW_TO_CONVERT}')
  try:
    with np.load(path) as data:
      state_dict = {key: data[key] for key in data.files}
  except Exception as e:
    raise ConfigError(f'Cannot read {path} as a .npz of arrays ({e}). {HOW_TO_CONVERT}') from e
  return inception_params_from_torch_state_dict(state_dict)
