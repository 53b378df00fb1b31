"""Fashion-MNIST from TFDS with the MNIST set-up."""
from configs import mnist


def get_config():
  config = mnist.get_config()
  config.data.dataset = 'fashion_mnist'
  return config
