"""CelebA-HQ 256x256 (TFDS `celeb_a_hq/256`, read by random access), Ho et al.'s 256px U-Net (113.7M).

Prepare it once (manual download, array_record files): `tfds build celeb_a_hq/256
--file_format=array_record --manual_dir=TARS --data_dir=DIR`, then set --config.data.data_dir=DIR.
"""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.dataset = 'celebahq'
  config.data.image_size = 256
  config.data.random_flip = True
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0
  config.optim.learning_rate = 2e-5
  config.training.batch_size = 64
  config.training.num_train_steps = 500_000
  config.sampling.spacing = 'uniform'
  config.sampling.variance = 'fixedsmall'
  config.sampling.num_samples = 16
  config.sampling.batch_size = 16
  return config
