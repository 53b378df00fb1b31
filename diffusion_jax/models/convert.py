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


# Every keyword argument of diffusers' UNet2DModel (0.42; tests/fixtures/diffusers_unet2d_signature.json) with
# diffusers' default, which a config.json without the key gets. Read into this U-Net's config:
MAPPED_KEYS = {'sample_size': None, 'in_channels': 3, 'out_channels': 3, 'block_out_channels': (224, 448, 672, 896),
               'layers_per_block': 2, 'norm_num_groups': 32, 'dropout': 0.0,
               'down_block_types': ('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
               'up_block_types': ('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D')}
# Must hold Ho et al.'s value, the only network this U-Net builds: key -> (diffusers' default, Ho et al.'s).
FIXED_KEYS = {'center_input_sample': (False, False), 'time_embedding_type': ('positional', 'positional'),
              'freq_shift': (0, 1), 'flip_sin_to_cos': (True, False), 'mid_block_type': ('UNetMidBlock2D',
                                                                                      'UNetMidBlock2D'),
              'mid_block_scale_factor': (1, 1), 'downsample_padding': (1, 0), 'downsample_type': ('conv', 'conv'),
              'upsample_type': ('conv', 'conv'), 'act_fn': ('silu', 'silu'), 'attention_head_dim': (8, None),
              'norm_eps': (1e-5, 1e-6), 'resnet_time_scale_shift': ('default', 'default'),
              'add_attention': (True, True), 'class_embed_type': (None, None), 'num_class_embeds': (None, None)}
# Ho et al.'s network for None or one value that depends on other keys (checked in model_config_from_diffusers):
# the time embedding's width (4 x the first width) and the middle attention's GroupNorm groups (norm_num_groups).
DEPENDENT_KEYS = {'time_embedding_dim': None, 'attn_norm_num_groups': None}
NO_EFFECT_KEYS = {'num_train_timesteps': None}  # Sizes a learned time embedding only (refused above).
DOWN_BLOCKS, UP_BLOCKS = ('DownBlock2D', 'AttnDownBlock2D'), ('UpBlock2D', 'AttnUpBlock2D')


def model_config_from_diffusers(config: dict) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(config.model, config.data with image_size and channels) of the UNet equal to a diffusers config.json.

  Raises a one-line ConfigError naming the first key (and its value) that this U-Net does not implement,
  including keys unknown to this importer; keys starting with '_' are diffusers' metadata.
  """
  known = {**MAPPED_KEYS, **{k: v[0] for k, v in FIXED_KEYS.items()}, **DEPENDENT_KEYS, **NO_EFFECT_KEYS}
  unknown = sorted(k for k in config if k not in known and not k.startswith('_'))
  if unknown:
    raise ConfigError(f'Unknown UNet2DModel config key {unknown[0]!r} (= {config[unknown[0]]!r}): this importer '
                      'cannot tell whether it changes the network, so it refuses the model.')
  config = {**known, **config}
  for key, (_, ho) in FIXED_KEYS.items():
    if config[key] != ho:
      raise ConfigError(f'UNet2DModel {key}={config[key]!r} is not implemented (Ho et al.\'s architecture has '
                        f'{key}={ho!r}); this model cannot be imported.')
  widths = list(config['block_out_channels'])
  ch = widths[0]
  for key, allowed in (('time_embedding_dim', 4 * ch), ('attn_norm_num_groups', config['norm_num_groups'])):
    if config[key] not in (None, allowed):
      raise ConfigError(f'UNet2DModel {key}={config[key]!r} is not implemented (only None or {allowed} here); '
                        'this model cannot be imported.')
  if any(w % ch for w in widths):
    raise ConfigError(f'block_out_channels {widths} are not multiples of the first width {ch}.')
  down, up = list(config['down_block_types']), list(config['up_block_types'])
  for key, kinds, allowed in (('down_block_types', down, DOWN_BLOCKS), ('up_block_types', up, UP_BLOCKS)):
    if any(kind not in allowed for kind in kinds) or len(kinds) != len(widths):
      raise ConfigError(f'UNet2DModel {key}={kinds} is not implemented: one of {list(allowed)} per width of '
                        f'block_out_channels {widths}.')
  if [kind.startswith('Attn') for kind in down] != [kind.startswith('Attn') for kind in reversed(up)]:
    raise ConfigError(f'Attention in down_block_types {down} and up_block_types {up} is not symmetric.')
  if config['out_channels'] != config['in_channels']:
    raise ConfigError(f'UNet2DModel out_channels={config["out_channels"]} differs from in_channels='
                      f'{config["in_channels"]}: not implemented, as a diffusion model here predicts an output of '
                      'its input\'s shape (eps, x0 or v).')
  size = config['sample_size']
  size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
  if not isinstance(size, int) or isinstance(size, bool):
    raise ConfigError(f'UNet2DModel sample_size={config["sample_size"]!r} is not implemented: a square size (an '
                      'integer) is.')
  model = ml_collections.ConfigDict(dict(
      ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=config['layers_per_block'],
      attn_resolutions=tuple(size // 2**level for level, kind in enumerate(down) if kind.startswith('Attn')),
      dropout=float(config['dropout']), resamp_with_conv=True, num_groups=config['norm_num_groups'],
      num_classes=0))  # Class embeddings are refused above.
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
    raise ConfigError('Cannot convert the diffusers state dict: ' + ' '.join(problems))
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
