"""The embedded demo without labels: an unconditional U-Net of the same size, data and training.

The demo (configs/default.py) is class-conditional; docs/guide.md compares the two.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.num_classes = 0
  return config
