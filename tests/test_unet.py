"""The U-Net: parameter counts of the paper, initialisation, bad settings and parity with diffusers."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURES
from diffusion_jax.checks import ConfigError
from diffusion_jax.models import convert
from diffusion_jax.models.unet import UNet, timestep_embedding, unet_from_config


def count_params(model, size, channels=3):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)),
                                             jnp.zeros((1,), jnp.int32)))
  return sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_cifar10_parameter_count():
  assert count_params(UNet(), 32) == 35_746_307  # Ho et al. (2020), CIFAR-10.


def test_256px_parameter_count():
  model = UNet(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,), dropout=0.0)
  assert count_params(model, 256) == 113_673_219  # CelebA-HQ / LSUN models.


def test_cifar10_config_file_builds_the_paper_model():
  from configs import cifar10
  config = cifar10.get_config()
  assert count_params(unet_from_config(config.model), config.data.image_size) == 35_746_307


@pytest.mark.slow
def test_output_is_near_zero_at_init():
  model = UNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), num_groups=8)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  t = jnp.array([3, 900])
  params = model.init(jax.random.key(1), x, t)
  out = model.apply(params, x, t)
  assert out.shape == x.shape
  assert float(jnp.abs(out).max()) < 1e-3


@pytest.mark.slow
def test_non_power_of_two_size_is_padded_and_cropped():
  """28x28 pads to 32 (for 4 levels) and crops back; the padding never leaks into the crop's shape."""
  model = UNet(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8)
  x = jnp.ones((1, 28, 28, 1))
  params = model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))
  assert model.apply(params, x, jnp.zeros((1,), jnp.int32)).shape == (1, 28, 28, 1)


def test_timestep_embedding_formula():
  t = jnp.array([0, 7, 999])
  emb = timestep_embedding(t, 8)
  w = np.exp(-np.log(10000) * np.arange(4) / 3)
  np.testing.assert_allclose(emb, np.concatenate([np.sin(np.outer(t, w)), np.cos(np.outer(t, w))], 1), atol=1e-4)


@pytest.mark.parametrize('kwargs, size, message', [
    (dict(attn_resolutions=(12,)), 32, r'attention resolution\(s\) \[12\] never occur.*\[32, 16, 8, 4\]'),
    (dict(ch=48), 32, r'channel widths \[48\].*not divisible by the 32 GroupNorm groups'),
    (dict(ch_mult=(1, 2, 2, 2, 2, 2)), 16, r'image size 16 is too small for 6 levels'),
])
def test_bad_settings(kwargs, size, message):
  model = UNet(**kwargs)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32)))


def load_fixture(name):
  with open(os.path.join(FIXTURES, f'diffusers_unet_{name}.json')) as f:
    meta = json.load(f)
  state_dict = load_file(os.path.join(FIXTURES, f'diffusers_unet_{name}.safetensors'))
  io = np.load(os.path.join(FIXTURES, f'diffusers_unet_{name}_io.npz'))
  return meta, state_dict, io


@pytest.mark.parametrize('name', ['cifar_like', 'two_attn'])
def test_parity_with_diffusers(name):
  """Same random weights: our output equals diffusers' UNet2DModel within 1e-4 (t = 0, 1, 500, 999)."""
  meta, state_dict, io = load_fixture(name)
  model_config, data_config = convert.model_config_from_diffusers(meta['config'])
  model = unet_from_config(model_config)
  params = convert.params_from_state_dict(state_dict, model, data_config.image_size, data_config.channels)
  assert sum(np.size(x) for x in jax.tree.leaves(params)) == meta['param_count']
  out = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))(params, io['x'], io['t'])
  np.testing.assert_allclose(out, io['out'], atol=1e-4, rtol=1e-4)
  assert np.abs(io['out']).max() > 0.1  # The reference is not trivially small.


def test_legacy_attention_names_are_accepted():
  meta, state_dict, _ = load_fixture('two_attn')
  renamed = {k.replace('to_q.', 'query.').replace('to_out.0.', 'proj_attn.'): v for k, v in state_dict.items()}
  model_config, data_config = convert.model_config_from_diffusers(meta['config'])
  model = unet_from_config(model_config)
  size = data_config.image_size
  a = convert.params_from_state_dict(state_dict, model, size, 1)
  b = convert.params_from_state_dict(renamed, model, size, 1)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_bad_state_dicts():
  meta, state_dict, _ = load_fixture('two_attn')
  model_config, data_config = convert.model_config_from_diffusers(meta['config'])
  model = unet_from_config(model_config)
  size = data_config.image_size
  missing = dict(state_dict)
  del missing['conv_out.weight']
  with pytest.raises(ValueError, match=r"Missing 1 parameter\(s\).*conv_out/kernel"):
    convert.params_from_state_dict(missing, model, size, 1)
  extra = dict(state_dict, **{'down_blocks.0.resnets.7.conv1.weight': np.zeros((32, 32, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"Unexpected key 'down_blocks.0.resnets.7.conv1.weight'"):
    convert.params_from_state_dict(extra, model, size, 1)
  wrong = dict(state_dict, **{'conv_in.weight': np.zeros((32, 3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"Shape mismatch for 'conv_in.weight'"):
    convert.params_from_state_dict(wrong, model, size, 1)


def test_the_importer_decides_about_every_key_of_diffusers_unet2dmodel():
  """Each keyword of UNet2DModel (recorded from diffusers) is read, fixed, dependent or without effect here, with
  diffusers' own default (what a config.json without it means)."""
  with open(os.path.join(FIXTURES, 'diffusers_unet2d_signature.json')) as f:
    defaults = json.load(f)['defaults']
  tables = (convert.MAPPED_KEYS, {k: v[0] for k, v in convert.FIXED_KEYS.items()}, convert.DEPENDENT_KEYS,
            convert.NO_EFFECT_KEYS)
  ours = {k: list(v) if isinstance(v, tuple) else v for table in tables for k, v in table.items()}
  assert sum(map(len, tables)) == len(ours)  # No key in two tables.
  assert ours == defaults


# (key, value, the message's phrase): every setting of another network is refused before the weights are read.
REFUSED = [(key, 'other', f"UNet2DModel {key}='other' is not implemented") for key in (
    'time_embedding_type', 'mid_block_type', 'downsample_type', 'upsample_type', 'act_fn', 'resnet_time_scale_shift')]
REFUSED += [('center_input_sample', True, 'center_input_sample=True'), ('freq_shift', 0, 'freq_shift=0'),
            ('flip_sin_to_cos', True, 'flip_sin_to_cos=True'), ('mid_block_scale_factor', 2, 'factor=2 is not'),
            ('downsample_padding', 1, 'downsample_padding=1'), ('attention_head_dim', 8, 'attention_head_dim=8'),
            ('norm_eps', 1e-5, 'norm_eps=1e-05'), ('add_attention', False, 'add_attention=False is not implemented'),
            ('class_embed_type', 'timestep', "class_embed_type='timestep'"), ('num_class_embeds', 10, 'embeds=10'),
            ('time_embedding_dim', 64, 'time_embedding_dim=64 is not implemented (only None or 128 here)'),
            ('attn_norm_num_groups', 4, 'attn_norm_num_groups=4 is not implemented (only None or 32 here)'),
            ('out_channels', 2, 'out_channels=2 differs from in_channels=1: not implemented'),
            ('down_block_types', ['ResnetDownsampleBlock2D'] * 3, "down_block_types=['ResnetDownsampleBlock2D'"),
            ('up_block_types', ['UpBlock2D', 'AttnSkipUpBlock2D', 'AttnUpBlock2D'], "'AttnSkipUpBlock2D'"),
            ('sample_size', None, 'sample_size=None is not implemented'), ('sample_size', [16, 32], 'sample_size=[16, 32]'),
            ('new_upstream_key', 1, "Unknown UNet2DModel config key 'new_upstream_key' (= 1)")]


@pytest.mark.parametrize('key, value, phrase', REFUSED)
def test_the_importer_refuses_other_networks_in_one_line(key, value, phrase):
  meta, _, _ = load_fixture('two_attn')
  with pytest.raises(ConfigError, match=re.escape(phrase)) as error:
    convert.model_config_from_diffusers(dict(meta['config'], **{key: value}))
  assert '\n' not in str(error.value)


def test_keys_that_name_ho_et_al_s_network_another_way_import_it():
  """attn_norm_num_groups = norm_num_groups and time_embedding_dim = 4 ch are the network of the parity fixture;
  a config.json without freq_shift means diffusers' default 0, which is refused."""
  meta, _, _ = load_fixture('two_attn')
  same = convert.model_config_from_diffusers(meta['config'])
  assert convert.model_config_from_diffusers(dict(meta['config'], attn_norm_num_groups=32, time_embedding_dim=128,
                                                  _name_or_path='x')) == same
  without = {k: v for k, v in meta['config'].items() if k != 'freq_shift'}
  with pytest.raises(ConfigError, match='freq_shift=0 is not implemented'):
    convert.model_config_from_diffusers(without)


@pytest.mark.slow
def test_import_diffusers_checkpoint_into_a_workdir_and_sample(tmp_path):
  """The CLI path: a diffusers folder becomes a step-0 checkpoint that sample mode reads."""
  import shutil
  from configs import default
  from diffusion_jax import import_diffusers, sample
  meta, _, io = load_fixture('two_attn')
  model_dir = tmp_path / 'hub'
  model_dir.mkdir()
  with open(model_dir / 'config.json', 'w') as f:
    json.dump(meta['config'], f)
  shutil.copy(os.path.join(FIXTURES, 'diffusers_unet_two_attn.safetensors'),
              model_dir / 'diffusion_pytorch_model.safetensors')
  config = default.get_config()
  config.data.image_size, config.data.channels = 24, 1
  config.model.update(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(24, 12), num_groups=32)
  config.sampling.update(num_steps=2, num_samples=2, batch_size=2)
  with pytest.raises(ValueError, match=r"does not describe the model.*'model.num_classes': \(10, 0\)"):
    import_diffusers.import_to_workdir(config, str(model_dir), str(tmp_path / 'conditional'))  # The demo's labels.
  config.model.num_classes = 0
  state = import_diffusers.import_to_workdir(config, str(model_dir), str(tmp_path / 'run'))
  model = unet_from_config(config.model)
  out = model.apply({'params': state.ema_params}, io['x'], io['t'])
  np.testing.assert_allclose(out, io['out'], atol=1e-4)
  saved = np.load(os.path.join(sample.sample_from_workdir(config, str(tmp_path / 'run')), 'samples.npz'))
  assert saved['images'].shape == (2, 24, 24, 1) and int(saved['step']) == 0
  config.model.num_res_blocks = 2
  with pytest.raises(ValueError, match=r"does not describe the model.*'model.num_res_blocks': \(2, 1\)"):
    import_diffusers.import_to_workdir(config, str(model_dir), str(tmp_path / 'other'))
