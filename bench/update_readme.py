"""Rewrites the README's table of current figures from bench/results/vs_pytorch.json (after a benchmark run).

  python bench/vs_pytorch.py && python bench/update_readme.py

The table lies between the README's BEGIN and END comment lines; tests/test_readme.py checks that it is what
this script makes of the committed JSON, so the figures quoted are always those of the results file.
"""
import datetime
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'bench', 'results', 'vs_pytorch.json')
README = os.path.join(REPO, 'README.md')
BEGIN = '<!-- BEGIN table made by bench/update_readme.py from bench/results/vs_pytorch.json -->'
END = '<!-- END table -->'
GIB = 2.0**30
# Figures from other runs, quoted as they are until their benchmark writes a results file too.
OTHER_ROWS = (
    '| demo (class-conditional, 6,000 steps of batch 16, min-SNR, cosine rate): classifier FID / confident share, '
    'DDIM-100 eta 1, 1,000 samples | 9.8 / 0.85 (in batches of 250: 7.6 / 0.86); the unconditional demo '
    'until 2026-12-07: 14.4 / 0.70; until 2026-12-03: 26.8 / 0.62 ([history](#quality-of-the-demo)) | CPU (AMD EPYC, '
    '2 cores), 2026-12-07, `python main.py --config=configs/default.py --workdir=runs/digits --mode=eval '
    '--config.eval.num_samples=1000` |',
    '| GPU / TPU speed card (CIFAR-10, batch 128, float32 and bfloat16, vs PyTorch) | not measured yet: no session '
    'has been lent an accelerator | `python bench/speed_card.py` ([bench/README.md](bench/README.md#speed-card-on-a-gpu-or-tpu)) |',
)


def table(figures: dict) -> str:
  """The markdown table of a vs_pytorch.json: time ratios of every row, peak memory of the train rows."""
  date = datetime.datetime.fromisoformat(figures['date']).date().isoformat()
  first = figures['rows'][0]
  # The chip: the device kind on accelerators, the CPU model (the machine line up to its first comma) on CPUs.
  chip = first['device_kind'] if first['platform'] != 'cpu' else figures['machine'].split(',')[0]
  where = f'{first["platform"].upper()} ({chip}), {date}, `{figures["command"]}`'
  lines = ['| figure | value | machine, date, command |', '|---|---|---|']
  for r in figures['rows']:
    lines.append(f'| {r["model"]} {r["op"]}, batch {r["batch"]}: JAX / PyTorch time (s) | '
                 f'{r["jax_median"] / r["torch_median"]:.2f} ({r["jax_median"]:.3f} / {r["torch_median"]:.3f}) | '
                 f'{where} |')
  for r in figures['rows']:
    if r['op'] == 'train':
      lines.append(f'| {r["model"]} {r["op"]}, batch {r["batch"]}: peak memory JAX / PyTorch (GiB) | '
                   f'{r["jax_peak"] / GIB:.2f} / {r["torch_peak"] / GIB:.2f} | {where} |')
  return '\n'.join([*lines, *OTHER_ROWS])


def updated_readme(readme: str, figures: dict) -> str:
  start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
  return readme[:start] + '\n' + table(figures) + '\n' + readme[end:]


def main() -> None:
  with open(RESULTS) as f:
    figures = json.load(f)
  with open(README) as f:
    readme = f.read()
  with open(README, 'w') as f:
    f.write(updated_readme(readme, figures))
  print(f'Updated the table in {README} from {RESULTS}.', file=sys.stderr)


if __name__ == '__main__':
  main()
