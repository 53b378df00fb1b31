"""CelebA 64x64 (center crop and resize), the DDIM paper's U-Net for CelebA."""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.dataset = 'celeba'
  config.data.image_size = 64
  config.model.ch_mult = (1, 2, 2, 2, 4)
  config.model.attn_resolutions = (16,)
  config.training.num_train_steps = 500_000
  config.sampling.spacing = 'uniform'
  config.sampling.variance = 'fixedsmall'
  config.eval.num_samples = 50_000
  return config
