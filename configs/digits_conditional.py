"""Class-conditional digits with classifier-free guidance: the embedded demo with labels (Ho & Salimans 2022)."""
from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.loss_weighting = 'none'  # Ho et al.'s L_simple (the demo's default is min_snr).
  config.optim.lr_decay = 'constant'  # Ho et al. (the demo's default is cosine).
  config.model.num_classes = 10
  config.model.label_dropout = 0.1
  config.sampling.guidance_scale = 2.0
  config.sampling.num_samples = 100  # Ten of each class: one class per grid row.
  config.sampling.batch_size = 100
  return config
