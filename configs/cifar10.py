"""CIFAR-10 exactly as Ho et al. (2020): 35,746,307 parameters, 800k steps at batch 128."""
from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.loss_weighting = 'none'  # Ho et al.'s L_simple (the demo's default is min_snr).
  config.optim.lr_decay = 'constant'  # Ho et al. (the demo's default is cosine).
  config.num_cpu_devices = 1  # On CPUs one threaded device: as fast as one per core, one copy of the state.
  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True

  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.num_groups = 32
  config.model.num_classes = 0  # Unconditional (the demo is class-conditional).

  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip = 1.0

  config.training.batch_size = 128
  config.training.num_train_steps = 800_000
  config.training.log_every_steps = 100
  config.training.checkpoint_every_steps = 10_000
  config.training.sample_every_steps = 50_000
  config.training.keep_checkpoints = 3
  config.training.ema_decay = 0.9999
  config.training.ema_warmup = False

  config.sampling.method = 'ddim'
  config.sampling.num_steps = 100
  config.sampling.spacing = 'quadratic'  # As the DDIM paper for CIFAR-10.
  config.sampling.eta = 0.0
  config.sampling.variance = 'fixedlarge'  # Ho et al.'s CIFAR-10 samples.
  config.sampling.batch_size = 256
  config.eval.num_samples = 50_000  # Ho et al.'s FID protocol.
  config.eval.batch_size = 500
  return config
