"""The PyTorch side of bench/vs_pytorch.py: a diffusers `UNet2DModel` serving timing requests over stdin/stdout.

Runs in a side environment that has torch and diffusers (never the project's own venv):

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 diffusers
  /tmp/torchenv/bin/python bench/torch_worker.py   # Started by bench/vs_pytorch.py; speaks JSON lines.

Protocol: one JSON object per line each way. The worker first sends {"ok": true, "hello": {...}}, then
answers every request {"op": ...} with {"ok": true, ...} or {"ok": false, "error": "..."}:

  build    {"op": "build", "unet": UNet2DModel kwargs, "op_name": "train"|"forward"|"ddim"|"ddpm",
            "batch", "image_size", "channels", "padded_size", "alphas_cumprod", "betas", "timesteps",
            "prev_timesteps", "eta", "clip_x0", "optim": {...}, "ema_decay", "threads", "device", "dtype", "seed",
            "channels_last"?, "compile"? (torch.compile of the model, done by the first calls)}
           -> {"params": count}
  run      {"op": "run", "calls"?: n} -> {"seconds": s}: n calls in a row (default 1), timed in the worker.
  reset_peak / memory / quit.

The operations do the same work as the JAX side: a train step is the DDPM eps loss (uniform t, N(0, I)
noise, q_sample, MSE), backward, global-norm clipping, an Adam step and an EMA update of the params;
forward is an inference call under no_grad; ddim / ddpm run the sampler's loop of model calls and updates.

This file imports only the standard library at the top, so that vs_pytorch.py can share its protocol
helpers (`serve`, `memory`) with its own JAX worker.
"""
import ctypes
import json
import os
import re
import resource
import statistics
import sys
import time
import traceback


def _status_bytes(field: str) -> int | None:
  """A `VmHWM` / `VmRSS` line of /proc/self/status in bytes, or None where there is no /proc."""
  try:
    with open('/proc/self/status') as f:
      match = re.search(rf'^{field}:\s+(\d+) kB', f.read(), re.MULTILINE)
  except OSError:
    return None
  return int(match.group(1)) * 1024 if match else None


def reset_peak_rss() -> bool:
  """Resets the process's peak RSS (VmHWM and ru_maxrss) to its current RSS (Linux: clear_refs 5)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def memory() -> dict:
  """Resident memory of this process in bytes: now, and the peak since start or since the last reset."""
  peak = _status_bytes('VmHWM')
  if peak is None:  # No /proc: ru_maxrss, in kB on Linux and bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)
  return {'rss_now': _status_bytes('VmRSS'), 'rss_peak': peak}


def release_freed_memory() -> None:
  """glibc's malloc_trim(0), as diffusion_jax.xla_cpu.release_freed_memory (this file imports no project code)."""
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):  # Not glibc.
    pass


def serve(handlers: dict, hello: dict) -> None:
  """Answers JSON-line requests on stdin with handlers[request['op']](request) until {"op": "quit"}.

  The protocol uses a private copy of stdout; anything else that prints to stdout (libraries, C code)
  goes to stderr instead, so it cannot corrupt a reply. After a build, the heap's freed pages go back
  to the OS, on both sides, as a training run does after compiling its step.
  """
  replies = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr

  def reply(message):
    replies.write(json.dumps(message) + '\n')
    replies.flush()

  reply({'ok': True, 'hello': dict(hello, pid=os.getpid())})
  for line in sys.stdin:
    if not line.strip():
      continue
    request = json.loads(line)
    if request['op'] == 'quit':
      reply({'ok': True})
      return
    try:
      if request['op'] not in handlers:
        raise ValueError(f'Unknown op {request["op"]!r}; known: {sorted(handlers)} and quit.')
      answer = handlers[request['op']](request)
      if request['op'] == 'build':
        release_freed_memory()
      reply(dict(answer, ok=True))
    except Exception:  # pylint: disable=broad-except
      reply({'ok': False, 'error': traceback.format_exc()})


def median_seconds(fn, calls: int) -> float:
  """The median of `calls` timed calls of fn (which waits for its own work) after one untimed call."""
  fn()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def timed_run(fn, request: dict, wait) -> dict:
  """The answer to a run request: {'seconds': s} of request.get('calls', 1) calls of fn in a row, then wait(the
  last result) (the device's work done)."""
  if fn is None:
    raise ValueError('Nothing built: send {"op": "build", ...} first.')
  start = time.perf_counter()
  for _ in range(request.get('calls', 1)):
    out = fn()
  wait(out)
  return {'seconds': time.perf_counter() - start}


def sampler_step(op: str, x, eps, t: int, t_prev: int, ac: list[float], betas: list[float], eta: float,
                 clip_x0: bool, noise):
  """x_t -> x_{t_prev} for tensors x, eps (the model's output) as diffusion_jax.sampling's ddim_step / ddpm_step.

  ddim: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma noise (t_prev = -1: ab_prev = 1);
  ddpm: the posterior mean given x0 plus sqrt(beta_t) noise ('fixedlarge'), no noise at t = 0. With clip_x0,
  x0 is clipped to [-1, 1] (and, for DDIM, eps recomputed from it). noise: None where it is not used.
  """
  ab_t, ab_prev = ac[t], (ac[t_prev] if t_prev >= 0 else 1.0)
  x0 = (x - (1 - ab_t) ** 0.5 * eps) / ab_t ** 0.5
  if clip_x0:
    x0 = x0.clamp(-1, 1)
  if op == 'ddim':
    if clip_x0:
      eps = (x - ab_t ** 0.5 * x0) / (1 - ab_t) ** 0.5
    sigma = eta * ((1 - ab_prev) / (1 - ab_t)) ** 0.5 * (1 - ab_t / ab_prev) ** 0.5
    x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
    return x + sigma * noise if sigma > 0 else x
  beta = betas[t]
  mean = (beta * ab_prev ** 0.5 / (1 - ab_t)) * x0 + ((1 - ab_prev) * (1 - beta) ** 0.5 / (1 - ab_t)) * x
  return mean + beta ** 0.5 * noise if t > 0 else mean


class TorchBench:
  """One built operation of a diffusers UNet2DModel, timed call by call."""

  def __init__(self):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.fn = None
    self.device = None

  def build(self, r: dict) -> dict:
    torch = self.torch
    from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(r['threads'])
    torch.manual_seed(r['seed'])
    device = r['device']
    if device == 'auto':
      device = 'cuda' if torch.cuda.is_available() else 'cpu'
    self.device = torch.device(device)
    model = UNet2DModel(**r['unet']).to(self.device)
    params = sum(p.numel() for p in model.parameters())
    memory_format = torch.channels_last if r.get('channels_last') else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = torch.compile(model) if r.get('compile') else model  # Compiled by the first calls (the warm-up).
    batch, channels, size, padded = r['batch'], r['channels'], r['image_size'], r['padded_size']
    alphas_cumprod = torch.tensor(r['alphas_cumprod'], dtype=torch.float64)
    betas = torch.tensor(r['betas'], dtype=torch.float64)
    autocast_dtype = {'float32': None, 'bfloat16': torch.bfloat16}[r['dtype']]

    def model_fn(x, t):
      """Like our U-Net: zero-pads the bottom/right to the padded size, crops the output back; float32 out."""
      pad = padded - size
      if pad:
        x = torch.nn.functional.pad(x, (0, pad, 0, pad))
      with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = net(x.contiguous(memory_format=memory_format), t).sample
      return out[:, :, :size, :size].float()

    gen = torch.Generator().manual_seed(r['seed'] + 1)
    x0 = (torch.rand((batch, channels, size, size), generator=gen) * 2 - 1).to(self.device)
    op = r['op_name']
    if op == 'train':
      model.train()
      sqrt_ab = alphas_cumprod.sqrt().float().to(self.device)
      sqrt_1m_ab = (1 - alphas_cumprod).sqrt().float().to(self.device)
      o = r['optim']
      params_list = [p for p in model.parameters()]
      optimizer = torch.optim.Adam(params_list, lr=o['learning_rate'], betas=(o['beta1'], o['beta2']), eps=o['eps'])
      ema = [p.detach().clone() for p in params_list]
      num_timesteps = len(r['alphas_cumprod'])

      def step():
        t = torch.randint(0, num_timesteps, (batch,), device=self.device)
        noise = torch.randn_like(x0)
        shape = (batch, 1, 1, 1)
        x_t = sqrt_ab[t].view(shape) * x0 + sqrt_1m_ab[t].view(shape) * noise
        loss = torch.nn.functional.mse_loss(model_fn(x_t, t), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_list, o['grad_clip'])
        optimizer.step()
        with torch.no_grad():
          torch._foreach_lerp_(ema, params_list, 1.0 - r['ema_decay'])  # pylint: disable=protected-access
        return loss

      self.fn = step
    elif op == 'forward':
      model.eval()
      t = torch.randint(0, len(r['alphas_cumprod']), (batch,), generator=gen).to(self.device)

      def forward():
        with torch.no_grad():
          return model_fn(x0, t)

      self.fn = forward
    elif op in ('ddim', 'ddpm'):
      model.eval()
      self.fn = self._sampler(op, model_fn, alphas_cumprod, betas, r, (batch, channels, size, size))
    else:
      raise ValueError(f'Unknown operation {op!r}.')
    return {'params': params, 'device': str(self.device)}

  def _sampler(self, op, model_fn, alphas_cumprod, betas, r, shape):
    """A plain loop of model calls and `sampler_step` updates."""
    torch = self.torch
    batch = shape[0]
    ac, betas = [float(a) for a in alphas_cumprod], [float(b) for b in betas]
    steps = list(zip(r['timesteps'], r['prev_timesteps']))
    eta, clip_x0 = r['eta'], r['clip_x0']

    def run():
      with torch.no_grad():
        x = torch.randn(shape, device=self.device)
        for t, t_prev in steps:
          eps = model_fn(x, torch.full((batch,), t, device=self.device, dtype=torch.long))
          noisy = (op == 'ddpm' and t > 0) or (op == 'ddim' and eta > 0)
          x = sampler_step(op, x, eps, t, t_prev, ac, betas, eta, clip_x0, torch.randn_like(x) if noisy else None)
        return x

    return run

  def run(self, r: dict) -> dict:
    def wait(out):
      if self.device.type == 'cuda':
        self.torch.cuda.synchronize()
      float(out.sum() if out.dim() else out)  # Forces the result, as block_until_ready on the JAX side.
    return timed_run(self.fn, r, wait)

  def reset_peak(self, r: dict) -> dict:
    del r
    if self.device is not None and self.device.type == 'cuda':
      self.torch.cuda.reset_peak_memory_stats()
    return {'reset': reset_peak_rss()}

  def memory(self, r: dict) -> dict:
    del r
    stats = memory()
    if self.device is not None and self.device.type == 'cuda':
      stats['device_peak'] = self.torch.cuda.max_memory_allocated()
    return stats


def main():
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f'torch_worker: {e}. Create the side environment with: python3 -m venv /tmp/torchenv && '
          '/tmp/torchenv/bin/pip install torch==2.13.0 diffusers', file=sys.stderr)
    sys.exit(2)
  bench = TorchBench()
  hello = {'torch': torch.__version__, 'diffusers': diffusers.__version__, 'python': sys.version.split()[0],
           'cuda': torch.cuda.is_available(), 'memory': memory()}
  serve({'build': bench.build, 'run': bench.run, 'reset_peak': bench.reset_peak, 'memory': bench.memory}, hello)


if __name__ == '__main__':
  main()
