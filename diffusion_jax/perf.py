"""Speed figures: FLOPs from XLA's cost analysis, the device's peak, and a meter of steps/s, images/s and MFU.

MFU (model FLOPs utilization) = FLOPs per step (XLA's count of the program, with UNCOUNTED_FLOPS) x steps/s / the
device's dense peak.
The peaks are the vendors' dense (no sparsity) figures per chip: bfloat16 tensor-core throughput, and for
float32 what XLA's default precision uses (TF32 tensor cores on NVIDIA GPUs, bfloat16 passes on TPUs).
"""
from collections.abc import Callable
import time

# Dense peak TFLOP/s by device-kind substring (first match wins; jax.Device.device_kind). Sources: the NVIDIA
# H100 / H200 / A100 datasheets (SXM), the Google Cloud TPU pages (per chip).
PEAK_TFLOPS = (('H100 PCIe', {'bfloat16': 756.0, 'float32': 378.0}),
               ('H100', {'bfloat16': 989.0, 'float32': 494.0}),
               ('H200', {'bfloat16': 989.0, 'float32': 494.0}),
               ('A100', {'bfloat16': 312.0, 'float32': 156.0}),
               ('TPU v4', {'bfloat16': 275.0, 'float32': 275.0}),
               ('TPU v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),  # v5e
               ('TPU v5', {'bfloat16': 459.0, 'float32': 459.0}),  # v5p
               ('TPU v6 lite', {'bfloat16': 918.0, 'float32': 918.0}))  # v6e (Trillium)


def peak_flops(device_kind: str, dtype: str, peak_tflops: float = 0.0) -> float | None:
  """The dense peak FLOP/s of one device for compute dtype 'float32' | 'bfloat16'; peak_tflops > 0 overrides.

  None for devices outside PEAK_TFLOPS (CPUs among them): no MFU without a peak.
  """
  if peak_tflops:
    return peak_tflops * 1e12
  for key, peaks in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return peaks[dtype] * 1e12
  return None


# FLOPs that XLA's cost analysis cannot see (custom calls that a backend module emits), each a function of the
# program's HLO text; xla_cpu adds oneDNN's convolutions and matrix products.
UNCOUNTED_FLOPS: list[Callable[[str], float]] = []


def cost_flops(lowered_or_compiled) -> float:
  """The 'flops' of XLA's cost analysis of a jax Lowered or Compiled program (0.0 where XLA gives none), plus
  those of UNCOUNTED_FLOPS."""
  cost = lowered_or_compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get('flops', 0.0))
  if UNCOUNTED_FLOPS:
    lowered = hasattr(lowered_or_compiled, 'compile')
    text = lowered_or_compiled.as_text(dialect='hlo') if lowered else lowered_or_compiled.as_text()
    flops += sum(count(text) for count in UNCOUNTED_FLOPS)
  return flops


class Meter:
  """Steps/s, images/s and MFU of the steps between `start(step)` and `measure(step)`.

  Call `start` after any work that is not a train step (compilation, checkpoints, sample grids) and
  `measure` once the steps' results are on the host (e.g. after fetching their metrics), so that the
  interval holds exactly the steps' device time.
  """

  def __init__(self, batch_size: int, flops_per_step: float, peak: float | None, clock=time.perf_counter):
    self.batch_size, self.flops_per_step, self.peak, self.clock = batch_size, flops_per_step, peak, clock
    self.step = self.time = None

  def start(self, step: int) -> None:
    self.step, self.time = step, self.clock()

  def measure(self, step: int) -> dict:
    """{'steps_per_sec', 'images_per_sec', 'tflops_per_sec'[, 'mfu' in [0, 1] with a peak]}; {} without steps."""
    if self.step is None or step <= self.step:
      return {}
    steps_per_sec = (step - self.step) / max(self.clock() - self.time, 1e-9)
    out = {'steps_per_sec': steps_per_sec, 'images_per_sec': steps_per_sec * self.batch_size}
    if self.flops_per_step:
      out['tflops_per_sec'] = steps_per_sec * self.flops_per_step / 1e12
      if self.peak:
        out['mfu'] = steps_per_sec * self.flops_per_step / self.peak
    return out
