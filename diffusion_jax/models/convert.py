"""Import diffusers `UNet2DModel` checkpoints (the hub ports of Ho et al.'s DDPM models) into `UNet`.

The hub models google/ddpm-cifar10-32, google/ddpm-celebahq-256, google/ddpm-church-256 and
friends ship `config.json` plus `diffusion_pytorch_model.safetensors`; both are read here
with NumPy only (no torch). Conv weights are OIHW (Flax: HWIO); linear weights are (out, in).
"""
import json
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from diffusion_jax.checks import ConfigError, MissingFileError
from diffusion_jax.models.unet import UNet, unet_from_config

# Old checkpoints name the attention projections query/key/value/proj_attn (diffusers renames them on load).
LEGACY_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
RESNET_NAMES = {'norm1': 'norm0', 'conv1': 'conv0', 'time_emb_proj': 'temb_proj', 'norm2': 'norm1', 'conv2': 'conv1',
                'conv_shortcut': 'shortcut'}
ATTENTION_NAMES = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}


def model_config_from_diffusers(config: dict) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(config.model, config.data with image_size and channels) of the UNet equal to a diffusers config.json."""
  expected = dict(time_embedding_type='positional', freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6,
                  act_fn='silu', resnet_time_scale_shift='default', downsample_padding=0, center_input_sample=False,
                  mid_block_scale_factor=1, attention_head_dim=None, class_embed_type=None, num_class_embeds=None)
  differing = {k: config.get(k, v) for k, v in expected.items() if config.get(k, v) != v}
  if differing:
    raise ConfigError(f'This diffusers UNet2DModel differs from Ho et al.\'s architecture in {differing}; '
                      f'expected {({k: expected[k] for k in differing})}.')
  widths = list(config['block_out_channels'])
  ch = widths[0]
  if any(w % ch for w in widths):
    raise ConfigError(f'block_out_channels {widths} are not multiples of the first width {ch}.')
  down, up = config['down_block_types'], config['up_block_types']
  size = config['sample_size']
  size = size[0] if isinstance(size, (list, tuple)) else size
  attn_resolutions = [size // 2**level for level, kind in enumerate(down) if kind.startswith('Attn')]
  if [kind.startswith('Attn') for kind in down] != [kind.startswith('Attn') for kind in reversed(up)]:
    raise ConfigError(f'Attention in down_block_types {down} and up_block_types {up} is not symmetric.')
  if config['out_channels'] != config['in_channels']:
    raise ConfigError(f'out_channels={config["out_channels"]} differs from in_channels={config["in_channels"]}; '
                      f'this project predicts an output of the input\'s shape.')
  model = ml_collections.ConfigDict(dict(
      ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=config['layers_per_block'],
      attn_resolutions=tuple(attn_resolutions), dropout=float(config.get('dropout', 0.0)), resamp_with_conv=True,
      num_groups=config['norm_num_groups']))
  return model, ml_collections.ConfigDict(dict(image_size=size, channels=config['in_channels']))


def flax_name(key: str, num_levels: int) -> tuple[str, ...]:
  """A diffusers state-dict key (e.g. 'up_blocks.0.resnets.1.conv1.weight') as a path into UNet params."""
  for old, new in LEGACY_ATTENTION_NAMES.items():
    key = re.sub(rf'\.{old}\.(weight|bias)$', rf'.{new}.\1', key)
  module, leaf = key.rsplit('.', 1)
  top = {'conv_in': 'conv_in', 'time_embedding.linear_1': 'temb_dense0', 'time_embedding.linear_2': 'temb_dense1',
         'conv_norm_out': 'norm_out', 'conv_out': 'conv_out'}
  if module in top:
    return top[module], leaf
  match = re.fullmatch(r'(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)'
                       r'(?:\.(.+))?', module)
  mid = re.fullmatch(r'mid_block\.(resnets|attentions)\.(\d+)\.(.+)', module)
  if match:
    kind, level, part, index, rest = match.groups()
    level = int(level) if kind == 'down_blocks' else num_levels - 1 - int(level)
    prefix = 'down' if kind == 'down_blocks' else 'up'
    if part in ('downsamplers', 'upsamplers') and rest == 'conv':
      return f'{prefix}{level}_{part[:-2]}', leaf
    names = RESNET_NAMES if part == 'resnets' else ATTENTION_NAMES
    if rest in names:
      return f'{prefix}{level}_{"block" if part == "resnets" else "attn"}{index}', names[rest], leaf
  elif mid:
    part, index, rest = mid.groups()
    if part == 'resnets' and rest in RESNET_NAMES:
      return f'mid_block{index}', RESNET_NAMES[rest], leaf
    if part == 'attentions' and index == '0' and rest in ATTENTION_NAMES:
      return 'mid_attn', ATTENTION_NAMES[rest], leaf
  raise ConfigError(f'Unexpected key {key!r} in the diffusers state dict.')


def convert_tensor(value: np.ndarray, leaf: str) -> tuple[str, np.ndarray]:
  """A torch tensor as a Flax leaf: weight -> kernel (HWIO or (in, out)) or scale; bias -> bias."""
  value = np.asarray(value, np.float32)
  if leaf == 'bias':
    return 'bias', value
  if value.ndim == 1:
    return 'scale', value  # GroupNorm weight.
  if value.ndim == 4 and value.shape[2:] == (1, 1):  # 1x1 conv shortcut -> Dense.
    return 'kernel', value[:, :, 0, 0].T
  if value.ndim == 4:
    return 'kernel', value.transpose(2, 3, 1, 0)
  return 'kernel', value.T


def params_from_state_dict(state_dict: dict[str, np.ndarray], model: UNet, image_size: int,
                           in_channels: int) -> dict[str, Any]:
  """Converts a diffusers UNet2DModel state dict into params of `model`.

  Raises a ValueError listing missing keys, unexpected keys, or shape mismatches.
  """
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, image_size, image_size, in_channels),
                                                                         np.float32), np.zeros((1,), np.int32)))
  expected = {tuple(getattr(k, 'key', k) for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_leaves_with_path(expected['params'])}
  converted, problems = {}, []
  for key, value in state_dict.items():
    try:
      path = flax_name(key, len(model.ch_mult))
    except ValueError as e:
      problems.append(str(e))
      continue
    leaf, array = convert_tensor(value, path[-1])
    path = path[:-1] + (leaf,)
    if path not in expected:
      problems.append(f'Unexpected key {key!r} (no parameter {"/".join(path)} in this model).')
    elif expected[path] != array.shape:
      problems.append(f'Shape mismatch for {key!r}: {tuple(np.shape(value))} gives {array.shape}, the model '
                      f'needs {expected[path]}.')
    else:
      converted[path] = array
  missing = ['/'.join(p) for p in expected if p not in converted]
  if missing:
    problems.append(f'Missing {len(missing)} parameter(s) in the state dict: {missing[:8]}'
                    f'{" ..." if len(missing) > 8 else ""}.')
  if problems:
    raise ConfigError('Cannot convert the diffusers state dict:\n  ' + '\n  '.join(problems))
  params: dict[str, Any] = {}
  for path, array in converted.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = array
  return params


def load_diffusers_unet(path: str) -> tuple[UNet, dict[str, Any], ml_collections.ConfigDict,
                                            ml_collections.ConfigDict]:
  """Loads a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors).

  Returns (model, params, config.model, config.data with image_size and channels).
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(path, 'config.json')
  weights_path = os.path.join(path, 'diffusion_pytorch_model.safetensors')
  for p in (config_path, weights_path):
    if not os.path.exists(p):
      raise MissingFileError(f'{p} not found: a diffusers UNet2DModel folder holds config.json and '
                             f'diffusion_pytorch_model.safetensors (e.g. the unet/ folder of google/ddpm-cifar10-32).')
  with open(config_path) as f:
    diffusers_config = json.load(f)
  model_config, data_config = model_config_from_diffusers(diffusers_config)
  try:
    state_dict = load_file(weights_path)
  except Exception as e:
    raise ConfigError(f'Cannot read {weights_path}: {e}') from e
  model = unet_from_config(model_config)
  params = params_from_state_dict(state_dict, model, data_config.image_size, data_config.channels)
  return model, params, model_config, data_config
