"""Any folder of PNG/JPEG images at 64x64 RGB, with DDIM's CelebA-64 U-Net.

  --config=configs/folder64.py --config.data.folder=PATH

Top-level subfolders of PATH are classes (labels); set --config.data.folder_labels=False to
treat all images under PATH as one unlabeled set.
"""
from configs import celeba64


def get_config():
  config = celeba64.get_config()
  config.data.dataset = 'folder'
  return config
