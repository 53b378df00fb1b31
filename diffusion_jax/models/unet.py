"""The U-Net of Ho et al. (2020) in Flax linen, following the original TF code.

The model knows nothing about diffusion: it maps images x (B, H, W, C), integer
timesteps t (B,) and, for a class-conditional model, integer labels y (B,) to an output
of shape (B, H, W, out_channels).
"""
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.checks import ConfigError


def default_init(scale: float = 1.0):
  """Ho et al.'s init: variance scaling, fan_avg, uniform; scale 0 means 1e-10 (near zero)."""
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, 'fan_avg', 'uniform')


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding (B, dim) of t (B,): [sin(t w_i), cos(t w_i)], w_i = 10000^(-i/(dim/2 - 1))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def level_resolutions(image_size: int, num_levels: int) -> list[int]:
  """Feature-map heights at each level, after padding the image to a multiple of 2^(levels-1)."""
  factor = 2 ** (num_levels - 1)
  padded = -(-image_size // factor) * factor
  return [padded // 2**i for i in range(num_levels)]


def check_unet_config(image_size: int, in_channels: int, ch: int, ch_mult: Sequence[int],
                      attn_resolutions: Sequence[int], num_groups: int, num_res_blocks: int) -> None:
  """Raises a ConfigError naming the problem when the U-Net cannot be built for these settings."""
  if not isinstance(image_size, int) or image_size < 1:
    raise ConfigError(f'image size must be a positive integer, got {image_size!r}.')
  if in_channels < 1 or ch < 1 or num_res_blocks < 1 or not ch_mult:
    raise ConfigError(f'in_channels, ch, num_res_blocks and len(ch_mult) must be positive; got in_channels='
                      f'{in_channels}, ch={ch}, num_res_blocks={num_res_blocks}, ch_mult={tuple(ch_mult)}.')
  factor = 2 ** (len(ch_mult) - 1)
  if image_size < factor:
    raise ConfigError(f'image size {image_size} is too small for {len(ch_mult)} levels (ch_mult={tuple(ch_mult)}): '
                      f'it must be at least 2^(levels-1) = {factor}.')
  widths = sorted({ch * m for m in ch_mult})
  bad = [w for w in widths if w % num_groups]
  if bad:
    raise ConfigError(f'channel widths {bad} (ch={ch} x ch_mult={tuple(ch_mult)}) are not divisible by the '
                      f'{num_groups} GroupNorm groups (model.num_groups).')
  resolutions = level_resolutions(image_size, len(ch_mult))
  missing = [r for r in attn_resolutions if r not in resolutions]
  if missing:
    raise ConfigError(f'attention resolution(s) {missing} never occur: the feature maps of a {image_size}px image '
                      f'are {resolutions} with ch_mult={tuple(ch_mult)}.')


class ResnetBlock(nn.Module):
  """GroupNorm -> swish -> conv3x3 -> +Dense(swish(temb)) -> GroupNorm -> swish -> dropout -> conv3x3, + shortcut."""
  out_ch: int
  dropout: float
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool):
    conv = lambda name, scale=1.0: nn.Conv(self.out_ch, (3, 3), padding='SAME', kernel_init=default_init(scale),
                                           dtype=self.dtype, name=name)
    norm = lambda name: nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-6, dtype=self.dtype, name=name)
    h = conv('conv0')(nn.swish(norm('norm0')(x)))
    h = h + nn.Dense(self.out_ch, kernel_init=default_init(), dtype=self.dtype, name='temb_proj')(
        nn.swish(temb))[:, None, None, :]
    h = nn.swish(norm('norm1')(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv('conv1', scale=0.0)(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Dense(self.out_ch, kernel_init=default_init(), dtype=self.dtype, name='shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions, 1x1 (NIN) projections, residual."""
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    dense = lambda name, scale=1.0: nn.Dense(C, kernel_init=default_init(scale), dtype=self.dtype, name=name)
    h = nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    q, k, v = (dense(name)(h).reshape(B, H * W, C) for name in ('q', 'k', 'v'))
    logits = jnp.einsum('bic,bjc->bij', q, k).astype(jnp.float32) * C**-0.5  # Softmax in float32 under bf16.
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    h = jnp.einsum('bij,bjc->bic', weights, v).reshape(B, H, W, C)
    return x + dense('proj_out', scale=0.0)(h)


class UNet(nn.Module):
  """Ho et al.'s U-Net. Defaults are the CIFAR-10 model (35,746,307 parameters).

  Images whose height or width is not a multiple of 2^(len(ch_mult)-1) are zero-padded on
  the bottom and right up to one, and the output is cropped back (28x28 MNIST -> 32x32).
  attn_resolutions are feature-map heights after that padding.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  out_channels: Optional[int] = None  # None: as many as the input.
  num_groups: int = 32
  num_classes: int = 0  # > 0: class-conditional; label num_classes is the null (unconditional) label.
  dtype: jnp.dtype = jnp.float32  # Computation dtype; parameters stay float32.
  # Rematerialize each residual and attention block: its activations are recomputed in the backward pass
  # instead of kept (less memory for large images or batches, ~1/3 more compute; the same params and results).
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    """x: (B, H, W, C) images; t: (B,) int timesteps; y: (B,) int labels in [0, num_classes] (conditional only)."""
    B, H, W, C = x.shape
    if (y is None) != (self.num_classes == 0):
      raise ConfigError('A class-conditional U-Net (num_classes > 0) needs labels y and an unconditional one takes '
                        f'none; got num_classes={self.num_classes} and y={"None" if y is None else y.shape}.')
    num_levels = len(self.ch_mult)
    check_unet_config(H, C, self.ch, self.ch_mult, self.attn_resolutions, self.num_groups, self.num_res_blocks)
    factor = 2 ** (num_levels - 1)
    pad_h, pad_w = -H % factor, -W % factor
    h = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))).astype(self.dtype)

    conv3 = lambda ch, name, strides=1, scale=1.0: nn.Conv(ch, (3, 3), strides=strides, padding='SAME',
                                                           kernel_init=default_init(scale), dtype=self.dtype, name=name)

    temb = timestep_embedding(t, self.ch)
    temb = nn.Dense(4 * self.ch, kernel_init=default_init(), dtype=self.dtype, name='temb_dense0')(temb)
    temb = nn.Dense(4 * self.ch, kernel_init=default_init(), dtype=self.dtype, name='temb_dense1')(nn.swish(temb))
    if self.num_classes:  # A learned embedding per class plus one for the null label, added to temb.
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype, name='label_embedding')(y)

    resnet_block, attn_block = ResnetBlock, AttnBlock
    if self.remat:  # `train` (argument 3, counting self) selects dropout: static.
      resnet_block, attn_block = nn.remat(ResnetBlock, static_argnums=(3,)), nn.remat(AttnBlock)
    resblock = lambda out_ch, name, x: resnet_block(out_ch, self.dropout, self.num_groups, self.dtype, name=name)(
        x, temb, train)
    attn = lambda name, x: attn_block(self.num_groups, self.dtype, name=name)(x)

    hs = [conv3(self.ch, 'conv_in')(h)]
    for level, mult in enumerate(self.ch_mult):
      for block in range(self.num_res_blocks):
        h = resblock(self.ch * mult, f'down{level}_block{block}', hs[-1])
        if h.shape[1] in self.attn_resolutions:
          h = attn(f'down{level}_attn{block}', h)
        hs.append(h)
      if level != num_levels - 1:
        hs.append(self.downsample(hs[-1], f'down{level}_downsample'))

    h = resblock(h.shape[-1], 'mid_block0', hs[-1])
    h = attn('mid_attn', h)
    h = resblock(h.shape[-1], 'mid_block1', h)

    for level in reversed(range(num_levels)):
      for block in range(self.num_res_blocks + 1):
        h = resblock(self.ch * self.ch_mult[level], f'up{level}_block{block}',
                     jnp.concatenate([h, hs.pop()], axis=-1))
        if h.shape[1] in self.attn_resolutions:
          h = attn(f'up{level}_attn{block}', h)
      if level != 0:
        h = jax.image.resize(h, (B, h.shape[1] * 2, h.shape[2] * 2, h.shape[3]), 'nearest')
        if self.resamp_with_conv:
          h = conv3(h.shape[-1], f'up{level}_upsample')(h)
    assert not hs

    h = nn.swish(nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-6, dtype=self.dtype, name='norm_out')(h))
    h = conv3(self.out_channels or C, 'conv_out', scale=0.0)(h)
    return h[:, :H, :W, :].astype(jnp.float32)

  def downsample(self, x: jax.Array, name: str) -> jax.Array:
    """Halves the resolution: 3x3 stride-2 'SAME' conv, or 2x2 average pooling without conv."""
    if self.resamp_with_conv:
      return nn.Conv(x.shape[-1], (3, 3), strides=2, padding='SAME', kernel_init=default_init(),
                     dtype=self.dtype, name=name)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def unet_from_config(model_config) -> UNet:
  """The UNet described by config.model (model.dtype: 'float32', or 'bfloat16' compute with float32 params)."""
  dtype = model_config.get('dtype', 'float32')
  if dtype not in DTYPES:
    raise ConfigError(f'Unknown model.dtype {dtype!r}; choose one of {sorted(DTYPES)}.')
  return UNet(ch=model_config.ch, ch_mult=tuple(model_config.ch_mult), num_res_blocks=model_config.num_res_blocks,
              attn_resolutions=tuple(model_config.attn_resolutions), dropout=model_config.dropout,
              resamp_with_conv=model_config.resamp_with_conv, out_channels=model_config.get('out_channels'),
              num_groups=model_config.num_groups, num_classes=model_config.get('num_classes', 0),
              dtype=DTYPES[dtype], remat=model_config.get('remat', False))
