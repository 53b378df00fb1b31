"""launch/ scripts: dry-run commands, required arguments, shellcheck."""
import os
import shlex
import shutil
import subprocess

import pytest

from conftest import REPO

LAUNCH = os.path.join(REPO, 'launch')


def launch(script, *args):
  return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], capture_output=True, text=True, timeout=60)


def test_tpu_vm_train_runs_main_on_all_workers():
  result = launch('tpu_vm.sh', 'train', '--name', 'pod', '--zone', 'us-central2-b', '--config', 'configs/cifar10.py',
                  '--workdir', 'gs://bucket/runs/cifar10', '--override', '--config.training.batch_size=512',
                  '--dry-run')
  assert result.returncode == 0, result.stderr
  words = shlex.split(result.stdout)
  assert words[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod']
  assert '--worker=all' in words and '--zone=us-central2-b' in words
  remote = words[words.index('--command') + 1]
  assert 'python main.py --config=configs/cifar10.py --workdir=gs://bucket/runs/cifar10 ' \
         '--config.training.batch_size=512' in remote


@pytest.mark.parametrize('command, expected', [
    (['create', '--accelerator-type', 'v4-32', '--spot'],
     ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'pod', '--zone=z', '--accelerator-type=v4-32',
      '--version=tpu-ubuntu2204-base', '--spot']),
    (['delete'], ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'pod', '--zone=z', '--quiet']),
])
def test_tpu_vm_create_and_delete(command, expected):
  result = launch('tpu_vm.sh', command[0], '--name', 'pod', '--zone', 'z', *command[1:], '--dry-run')
  assert result.returncode == 0, result.stderr
  assert shlex.split(result.stdout) == expected


def test_tpu_vm_install_and_tensorboard():
  result = launch('tpu_vm.sh', 'install', '--name', 'pod', '--zone', 'z', '--dry-run')
  lines = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  assert lines[0][4] == 'scp' and lines[0][-1] == '--worker=all' and lines[0][7] == 'pod:diffusion_jax'
  assert "pip install -e '.[tpu]'" in lines[1][-1] and '--worker=all' in lines[1]
  result = launch('tpu_vm.sh', 'tensorboard', '--name', 'pod', '--zone', 'z', '--workdir', 'gs://b/r', '--dry-run')
  assert 'tensorboard --logdir gs://b/r --port 6006' in shlex.split(result.stdout)


@pytest.mark.parametrize('script, args, message', [
    ('tpu_vm.sh', ['create', '--zone', 'z'], '--name is required'),
    ('tpu_vm.sh', ['create', '--name', 'n'], '--zone is required'),
    ('tpu_vm.sh', ['train', '--name', 'n', '--zone', 'z', '--workdir', 'gs://b'], '--config is required for train'),
    ('tpu_vm.sh', ['train', '--name', 'n', '--zone', 'z', '--config', 'c.py'], '--workdir is required for train'),
    ('tpu_vm.sh', ['launch'], "unknown command 'launch'"),
    ('slurm.sh', ['--nodes', '2', '--gpus-per-node', '8', '--workdir', 'w'], '--config is required'),
    ('slurm.sh', ['--nodes', 'two'], '--nodes must be a positive integer'),
    ('local.sh', ['--', 'python', 'main.py'], "--num-processes must be a positive integer, got ''"),
    ('local.sh', ['--num-processes', '2'], 'no command given after --'),
])
def test_missing_arguments_are_clear_errors(script, args, message):
  result = launch(script, *args)
  assert result.returncode == 2
  assert message in result.stderr and '--help' in result.stderr


def test_help():
  for script in ('tpu_vm.sh', 'slurm.sh', 'local.sh'):
    result = launch(script, '--help')
    assert result.returncode == 0 and result.stdout.startswith('Usage: launch/' + script)


def test_slurm_batch_script():
  result = launch('slurm.sh', '--nodes', '4', '--gpus-per-node', '8', '--config', 'configs/cifar10.py', '--workdir',
                  '/shared/runs/c', '--partition', 'gpu', '--dry-run')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  for directive in ('--nodes=4', '--ntasks-per-node=1', '--gpus-per-node=8', '--partition=gpu', '--requeue'):
    assert f'#SBATCH {directive}' in lines
  assert lines[-1] == 'srun python main.py --config=configs/cifar10.py --workdir=/shared/runs/c'


def test_local_launcher_sets_the_process_environment():
  result = launch('local.sh', '--num-processes', '2', '--port', '5555', '--dry-run', '--', 'python', 'main.py',
                  '--workdir=w')
  lines = sorted(shlex.split(line) for line in result.stdout.strip().splitlines())
  assert lines == [['env', 'DIFFUSION_JAX_COORDINATOR=127.0.0.1:5555', 'DIFFUSION_JAX_NUM_PROCESSES=2',
                    f'DIFFUSION_JAX_PROCESS_ID={i}', 'python', 'main.py', '--workdir=w'] for i in (0, 1)]


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck is not installed (apt install shellcheck)')
def test_shellcheck():
  scripts = [os.path.join(LAUNCH, s) for s in sorted(os.listdir(LAUNCH)) if s.endswith('.sh')]
  result = subprocess.run(['shellcheck', *scripts], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
