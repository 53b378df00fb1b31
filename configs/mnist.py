"""MNIST from TFDS (60,000 digits), the seed projects' MNIST U-Net padded to 32x32."""
from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.loss_weighting = 'none'  # Ho et al.'s L_simple (the demo's default is min_snr).
  config.optim.lr_decay = 'constant'  # Ho et al. (the demo's default is cosine).
  config.num_cpu_devices = 1  # On CPUs one threaded device: as fast as one per core, one copy of the state.
  config.data.dataset = 'mnist'
  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.num_groups = 32
  config.model.dropout = 0.1
  config.model.num_classes = 0  # Unconditional (the demo is class-conditional).
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 1000
  config.training.batch_size = 128
  config.training.num_train_steps = 50_000
  config.training.checkpoint_every_steps = 2500
  config.training.sample_every_steps = 5000
  config.training.ema_decay = 0.9995
  config.eval.num_samples = 10_000
  return config
