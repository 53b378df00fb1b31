"""Every `python ...` command in the README's and docs' code blocks parses: its script or module exists, its flags
exist, its --config file loads and its --config.* overrides name existing keys with values of the right type."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

DOCUMENTS = ('README.md', 'docs/performance.md', 'bench/README.md')

# Runs one command's script or module with absl's app.run replaced by flag parsing (and loading --config).
PARSE_ONLY = """
import runpy, sys
from absl import app, flags
target, *sys.argv = sys.argv[1:]

def parse_only(main, argv=None, **kwargs):
  flags.FLAGS(sys.argv)
  if 'config' in flags.FLAGS:
    flags.FLAGS.config  # Loads the file and applies the --config.* overrides.
  raise SystemExit(0)

app.run = parse_only
sys.path.insert(0, '.')
if target.endswith('.py'):
  sys.path.insert(0, 'bench' if target.startswith('bench/') else '.')
  runpy.run_path(target, run_name='__main__')
else:
  runpy.run_module(target, run_name='__main__')
raise SystemExit('the command did not call app.run')
"""


def python_commands() -> list[tuple[str, list[str]]]:
  """(document, argv after 'python') of every python command in the documents' fenced code blocks."""
  commands = []
  for document in DOCUMENTS:
    with open(os.path.join(REPO, document)) as f:
      text = f.read()
    blocks = re.findall(r'```(?:bash|sh)?\n(.*?)```', text, re.S)
    indented = re.findall(r'(?m)^    (python .*)$', text)  # Indented code lines (docs/performance.md).
    for block in blocks + indented:
      for line in block.replace('\\\n', ' ').splitlines():
        for segment in line.split('&&'):
          words = shlex.split(segment.split('#')[0]) if segment.strip() else []
          if len(words) > 1 and words[0] in ('python', 'python3') and words[1] not in ('-c',):
            if words[1] == '-m' and words[2] in ('venv', 'pytest', 'pip'):
              continue
            commands.append((document, words[1:]))
  return commands


COMMANDS = python_commands()


def test_the_documents_have_commands():
  assert len(COMMANDS) >= 10
  assert any(argv[0] == 'main.py' for _, argv in COMMANDS)


@pytest.mark.parametrize('document, argv', COMMANDS, ids=[' '.join(argv)[:80] for _, argv in COMMANDS])
def test_command_parses(document, argv):
  target, args = (argv[1], argv[2:]) if argv[0] == '-m' else (argv[0], argv[1:])
  if target.endswith('.py'):
    assert os.path.isfile(os.path.join(REPO, target)), f'{document}: {target} does not exist'
  result = subprocess.run([sys.executable, '-c', PARSE_ONLY, target, target, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, f'{document}: python {shlex.join(argv)}\n{result.stderr[-3000:]}'


def test_the_figures_table_is_the_results_file():
  """The README's table of current figures is what bench/update_readme.py makes of bench/results/vs_pytorch.json."""
  sys.path.insert(0, os.path.join(REPO, 'bench'))
  import update_readme  # pylint: disable=g-import-not-at-top
  with open(update_readme.RESULTS) as f:
    figures = json.load(f)
  with open(update_readme.README) as f:
    readme = f.read()
  assert update_readme.updated_readme(readme, figures) == readme, 'run python bench/update_readme.py'
  assert f'| {figures["rows"][0]["jax_median"] / figures["rows"][0]["torch_median"]:.2f} (' in readme
  if figures['rows'][0]['platform'] == 'cpu':
    assert f'CPU ({figures["machine"].split(",")[0]}), ' in readme, 'each figure names the CPU model it ran on'
