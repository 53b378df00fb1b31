"""LSUN 256x256 (TFDS `lsun/CATEGORY`, read by random access), Ho et al.'s 256px U-Net (113.7M).

  --config=configs/lsun256.py             # church_outdoor
  --config=configs/lsun256.py:bedroom     # any LSUN category

Prepare it once as array_record files: `tfds build lsun/CATEGORY --file_format=array_record
--data_dir=DIR`, then set --config.data.data_dir=DIR.
"""
from configs import celebahq256

# Ho et al.'s training steps; they mirrored every dataset but LSUN bedroom.
STEPS = {'bedroom': 2_400_000, 'cat': 1_800_000, 'church_outdoor': 1_200_000}


def get_config(category: str = 'church_outdoor'):
  config = celebahq256.get_config()
  config.data.dataset = f'lsun/{category}'
  config.data.random_flip = category != 'bedroom'
  config.training.num_train_steps = STEPS.get(category, STEPS['church_outdoor'])
  return config
