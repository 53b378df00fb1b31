"""Speed figures (diffusion_jax/perf.py), TensorFlow-free training and its TensorBoard files, the profiler trace,
model.remat, the speed card (bench/speed_card.py) in its smoke mode, and what bench/conv_kernels.py measures."""
import glob
import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_file_loader

from conftest import REPO
from configs.tiny import get_config as tiny_config
from diffusion_jax import experiment, perf, train, writers
from diffusion_jax.models.unet import unet_from_config


def test_peak_flops_by_device_kind_and_override():
  assert perf.peak_flops('NVIDIA H200', 'bfloat16') == 989e12
  assert perf.peak_flops('NVIDIA H100 PCIe', 'bfloat16') == 756e12  # The PCIe card before the SXM one.
  assert perf.peak_flops('TPU v5 lite', 'float32') == 197e12
  assert perf.peak_flops('cpu', 'float32') is None
  assert perf.peak_flops('cpu', 'float32', peak_tflops=2.5) == 2.5e12


def test_meter_reports_steps_images_flops_and_mfu_of_the_timed_interval():
  now = [100.0]
  meter = perf.Meter(batch_size=32, flops_per_step=2e12, peak=10e12, clock=lambda: now[0])
  assert meter.measure(5) == {}  # Not started.
  meter.start(10)
  now[0] += 4.0
  out = meter.measure(30)  # 20 steps in 4 s.
  assert out == pytest.approx({'steps_per_sec': 5.0, 'images_per_sec': 160.0, 'tflops_per_sec': 10.0, 'mfu': 1.0})
  assert 'mfu' not in perf.Meter(32, 2e12, None, clock=lambda: now[0]).measure(1)


def test_train_step_flops_do_not_depend_on_gradient_accumulation():
  """The same update from 2 micro-batches counts the FLOPs of the whole batch (within the update's share)."""
  flops = []
  for accum in (1, 2):
    config = tiny_config()
    config.training.grad_accum_steps = accum
    exp = experiment.build(config)
    step = train.make_train_step(exp).compile(exp.abstract_state, train.batch_spec(exp), jax.random.key(1))
    flops.append(step.flops(exp.mesh.size))
  assert flops[0] > 1e6
  assert flops[1] == pytest.approx(flops[0], rel=0.05)


@pytest.mark.parametrize('dropout', [0.0, 0.3])
def test_remat_gives_the_same_params_outputs_and_gradients(dropout):
  config = tiny_config()
  config.model.dropout = dropout
  plain = unet_from_config(config.model)
  config.model.remat = True
  remat = unet_from_config(config.model)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  t = jax.numpy.arange(4)
  params = experiment.init_params(plain, config.data, jax.random.key(1))
  assert jax.tree.structure(params) == jax.tree.structure(experiment.init_params(remat, config.data, jax.random.key(1)))

  def loss(model, p):
    out = model.apply({'params': p}, x, t, train=True, rngs={'dropout': jax.random.key(2)})
    return (out**2).mean()

  value, grads = jax.value_and_grad(lambda p: loss(plain, p))(params)
  value_remat, grads_remat = jax.value_and_grad(lambda p: loss(remat, p))(params)
  assert value > 0
  np.testing.assert_allclose(value_remat, value, rtol=1e-6)
  for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    np.testing.assert_allclose(g_remat, g, rtol=1e-5, atol=1e-7)


def read_events(logdir: str) -> dict:
  """tag -> [(step, value or image bytes)] of the event files in logdir."""
  out = {}
  for path in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    for event in event_file_loader.LegacyEventFileLoader(path).Load():
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.image.encoded_image_string if v.HasField('image')
                                          else v.simple_value))
  return out


def test_event_writer_writes_scalars_and_png_images_that_tensorboard_reads(tmp_path):
  writer = writers.EventWriter(str(tmp_path))
  writer.write_scalars(3, {'loss': 0.25, 'perf/steps_per_sec': 7.0})
  grid = np.zeros((1, 5, 6, 3), np.uint8)
  grid[0, 1, 2] = 200
  writer.write_images(3, {'ema_samples': grid})
  writer.close()
  events = read_events(str(tmp_path))
  assert events['loss'] == [(3, 0.25)] and events['perf/steps_per_sec'] == [(3, 7.0)]
  (step, png), = events['ema_samples']
  assert step == 3
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), grid[0])


# Runs main.py with TensorFlow made unimportable, as on a GPU machine that has JAX alone.
WITHOUT_TENSORFLOW = """
import runpy, sys
sys.modules['tensorflow'] = None
sys.argv = ['main.py'] + sys.argv[1:]
runpy.run_path('main.py', run_name='__main__')
"""


@pytest.mark.slow
def test_training_without_tensorflow_logs_speed_to_tensorboard_and_writes_a_profile(tmp_path):
  workdir = str(tmp_path / 'run')
  args = [sys.executable, '-c', WITHOUT_TENSORFLOW, '--config=configs/tiny.py', f'--workdir={workdir}',
          '--config.training.num_train_steps=6', '--config.training.log_every_steps=3',
          '--config.training.checkpoint_every_steps=6', '--config.training.profile_steps=2',
          '--config.training.peak_tflops=0.5']
  result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  events = read_events(workdir)
  assert [step for step, _ in events['loss']] == [3, 6]
  for (_, steps), (_, images), (_, tflops), (_, mfu) in zip(
      events['perf/steps_per_sec'], events['perf/images_per_sec'], events['perf/tflops_per_sec'], events['perf/mfu']):
    assert steps > 0
    assert images == pytest.approx(8 * steps, rel=1e-5)  # tiny: batch 8.
    assert mfu == pytest.approx(tflops / 0.5, rel=1e-5)
  assert [step for step, _ in events['ema_samples']] == [6]
  traces = glob.glob(os.path.join(workdir, 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000
  assert 'Profiled steps 1 to 2' in result.stderr
  sampled = subprocess.run([sys.executable, '-c', WITHOUT_TENSORFLOW, '--config=configs/tiny.py',
                            f'--workdir={workdir}', '--mode=sample'], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert glob.glob(os.path.join(workdir, 'samples', '*', 'samples.npz'))


@pytest.mark.slow
def test_speed_card_smoke_mode_writes_the_card(tmp_path):
  """The speed card's whole path on the CPU: the JAX rows of a tiny model, the table and the JSON."""
  result = subprocess.run([sys.executable, 'bench/speed_card.py', '--smoke', '--dtypes=float32',
                           '--torch_python=none', f'--out_dir={tmp_path}'], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'speed_card.json') as f:
    card = json.load(f)
  params = sum(x.size for x in jax.tree.leaves(experiment.build(tiny_config()).abstract_params))
  assert card['params'] == params and card['platform'] == 'cpu'
  rows = {row['op']: row for row in card['rows']}
  assert sorted(rows) == ['DDIM-4', 'DPM-Solver++(2M)-4', 'forward', 'train']
  assert rows['train']['batch'] == 8 and rows['train']['seconds'] > 0 and rows['train']['flops'] > 0
  assert rows['DDIM-4']['model_calls'] == 4 and rows['DPM-Solver++(2M)-4']['model_calls'] == 4
  table = (tmp_path / 'speed_card.md').read_text()
  assert f'| JAX | train | float32 | 8 | {1 / rows["train"]["seconds"]:.1f} | {8 / rows["train"]["seconds"]:.0f} |' in table
  assert 'PyTorch rows: none (--torch_python=none)' in table
  assert table in result.stdout


def _conv_kernels():
  sys.path.insert(0, os.path.join(REPO, 'bench'))
  import conv_kernels  # pylint: disable=g-import-not-at-top  # bench/conv_kernels.py.
  return conv_kernels


@pytest.mark.parametrize('name', ['cifar10', 'default'])
def test_conv_kernels_finds_every_convolution_of_the_unet(name):
  """bench/conv_kernels.py measures what the network runs: its 3x3 convolutions counted from the architecture
  (conv_in, two per residual block, one per resampling, conv_out), the images' convolution marked first."""
  conv_kernels = _conv_kernels()
  config = conv_kernels.harness.load_config(name)
  config.training.batch_size = 4
  m = config.model
  levels, blocks = len(m.ch_mult), m.num_res_blocks
  residual_blocks = levels * blocks + 2 + levels * (blocks + 1)  # Down, middle, up (one more per level).
  expected = 1 + 2 * residual_blocks + 2 * (levels - 1) + 1
  convs = conv_kernels.model_convolutions(config)
  assert sum(c['count'] for c in convs) == expected
  size, channels = config.data.image_size, config.data.channels
  padded = -(-size // 2**(levels - 1)) * 2**(levels - 1)
  assert [c['lhs'] for c in convs if c['first']] == [[4, padded, padded, channels]]
  assert convs[0]['rhs'] == [3, 3, channels, m.ch] and convs[-1]['rhs'] == [3, 3, m.ch, channels]
  assert sum(c['count'] for c in convs if c['strides'] == [2, 2]) == levels - 1
  # 'SAME' padding: one pixel each side at stride 1; at stride 2 on even sizes only after (the PyTorch side
  # pads those itself).
  assert all(c['padding'] == ([[1, 1], [1, 1]] if c['strides'] == [1, 1] else [[0, 1], [0, 1]]) for c in convs)


def test_conv_kernels_totals_skip_the_images_input_gradient():
  conv_kernels = _conv_kernels()
  convs = [{'count': 1, 'first': True, 'jax': {'fwd': 1.0, 'dx': 2.0, 'dw': 4.0}},
           {'count': 3, 'first': False, 'jax': {'fwd': 10.0, 'dx': 20.0, 'dw': 40.0}}]
  assert conv_kernels.totals(convs, 'jax') == {'train': 1 + 4 + 3 * 70, 'forward': 1 + 30}


def test_conv_kernels_jax_columns_alone_write_the_table_and_totals(tmp_path):
  """--torch_python=none: one row per distinct convolution and totals that add them up as a step runs them."""
  result = subprocess.run([sys.executable, 'bench/conv_kernels.py', '--models=default', '--batch=4', '--calls=1',
                           '--rounds=1', '--torch_python=none', f'--out_dir={tmp_path}'], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'conv_kernels.json') as f:
    figures = json.load(f)['models']['default']
  convs = figures['convolutions']
  assert figures['jax'] == _conv_kernels().totals(convs, 'jax') and 'torch' not in figures
  table = (tmp_path / 'conv_kernels.md').read_text()
  assert len(re.findall(r'^\| \d+x\d+x\d+ \| 3x3 -> \d+ \|', table, re.MULTILINE)) == len(convs)
  assert f'all convolutions of a train step: JAX {figures["jax"]["train"]:.3f} s' in table


def test_conv_kernels_refuses_bad_counts_before_any_work():
  result = subprocess.run([sys.executable, 'bench/conv_kernels.py', '--calls=0', '--torch_python=none'], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and '--calls must be >= 1, got 0.' in result.stderr


TORCH_PYTHON = '/tmp/torchenv/bin/python'


@pytest.mark.skipif(not os.path.exists(TORCH_PYTHON), reason='no PyTorch side environment at /tmp/torchenv '
                    '(bench/README.md)')
@pytest.mark.parametrize('strides, padding', [([1, 1], [[1, 1], [1, 1]]), ([2, 2], [[0, 1], [0, 1]])])
def test_conv_kernels_pytorch_side_computes_the_jax_sides_convolution(tmp_path, strides, padding):
  """The two sides of bench/conv_kernels.py time the same forward, input gradient and kernel gradient."""
  conv_kernels = _conv_kernels()
  conv = {'lhs': [2, 6, 6, 3], 'rhs': [3, 3, 3, 4], 'strides': strides, 'padding': padding}
  passes = conv_kernels.jax_passes(conv)
  rng = np.random.default_rng(0)
  x = rng.normal(size=conv['lhs']).astype(np.float32)
  kernel = rng.normal(size=conv['rhs']).astype(np.float32)
  dy = rng.normal(size=passes['fwd'](x, kernel, None).shape).astype(np.float32)
  worker = conv_kernels.Worker('pytorch', [TORCH_PYTHON, conv_kernels.__file__, '--torch_worker'], dict(os.environ),
                               str(tmp_path))
  try:
    values = worker.call('conv', timeout=120, calls=1, threads=1, device='cpu',
                         inputs={'x': x.tolist(), 'kernel': kernel.tolist(), 'dy': dy.tolist()}, **conv)['values']
  finally:
    worker.close()
  for name, fn in passes.items():
    np.testing.assert_allclose(np.array(values[name]), fn(x, kernel, dy), rtol=1e-4, atol=1e-4, err_msg=name)
