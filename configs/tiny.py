"""A tiny model of the demo's set-up (8x8 digits, T=20): one train step compiles and runs in seconds.

For tests and for trying a code path quickly:
  python main.py --config=configs/tiny.py --workdir=/tmp/tiny
"""
from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.loss_weighting = 'none'  # Ho et al.'s L_simple (the demo's default is min_snr).
  config.optim.lr_decay = 'constant'  # Ho et al. (the demo's default is cosine).
  # XLA's kernels, whose programs the persistent compilation cache can keep (tests share one); oneDNN's cannot.
  config.cpu_kernels = 'xla'
  config.data.image_size = 8
  config.model.ch = 8
  config.model.ch_mult = (1, 2)
  config.model.attn_resolutions = (4,)
  config.model.num_groups = 4
  config.model.num_classes = 0  # Unconditional (the demo is class-conditional).
  config.diffusion.num_timesteps = 20
  config.training.batch_size = 8
  config.training.num_train_steps = 3
  config.training.log_every_steps = 1
  config.training.checkpoint_every_steps = 2
  config.training.sample_every_steps = 100
  config.sampling.num_steps = 4
  config.sampling.num_samples = 6
  config.sampling.batch_size = 4
  return config
