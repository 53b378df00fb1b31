"""Writing a benchmark's results: NAME.md (the table, as printed) and NAME.json (the figures) in one folder.

Every script under bench/ takes --out_dir (default bench/results/; '' writes nothing); the README and
docs/performance.md quote these files, so a rerun updates them without hand editing.
"""
import json
import os

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def write(out_dir: str, name: str, table: str, figures: dict) -> None:
  """Writes out_dir/name.md and out_dir/name.json, each whole and then renamed (never half a file)."""
  if not out_dir:
    return
  os.makedirs(out_dir, exist_ok=True)
  for path, text in ((f'{name}.md', table + '\n'), (f'{name}.json', json.dumps(figures, indent=1) + '\n')):
    path = os.path.join(out_dir, path)
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
  print(f'Wrote {os.path.join(out_dir, name)}.md and .json', flush=True)
