"""Class-conditional CIFAR-10: Ho et al.'s model and training with a label embedding and classifier-free guidance."""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.num_classes = 10
  config.model.label_dropout = 0.1
  config.sampling.guidance_scale = 1.0
  return config
