"""diffusion_jax: denoising diffusion models (DDPM, DDIM) in JAX/Flax.

Pure diffusion math: schedules.py (the Schedule pytree), diffusion.py (forward process, losses),
sampling.py (samplers). The network: models/unet.py. Training: experiment.py (one builder), optim.py,
train_state.py, train.py, checkpoints.py. Modes: sample.py, evaluate.py. Process set-up: runtime.py;
XLA:CPU tuning: xla_cpu.py (the only module that knows a backend).
"""
