"""Faults and misuse, injected: a second writer, stale locks, corrupt checkpoints, a full or read-only disk,
kills during sampling and saving, and the one-line errors of main.py."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO
from configs.tiny import get_config as tiny_config
from diffusion_jax import checkpoints, experiment, files, sample, train, workdir_lock
from diffusion_jax.checks import CheckpointError, NonFiniteLossError, WorkdirError

FAULT_SCRIPT = os.path.join(REPO, 'tests', 'run_main_with_fault.py')
TINY = ['--config=configs/tiny.py', '--config.training.log_every_steps=1']


def config_of(num_steps: int, checkpoint_every: int = 5):
  config = tiny_config()
  config.training.num_train_steps, config.training.checkpoint_every_steps = num_steps, checkpoint_every
  return config


def leaves(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state))]


def assert_same_state(a, b):
  assert int(a.step) == int(b.step)
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def straight_15(tmp_path_factory):
  """15 steps straight (checkpoints at 5, 10, 15): what a run that walks back to step 5 must end with."""
  return train.train_and_evaluate(config_of(15), str(tmp_path_factory.mktemp('straight')))


@pytest.fixture(scope='module')
def trained_10(tmp_path_factory):
  """A workdir of 10 steps with checkpoints at 5 and 10 (copied by each test that damages it)."""
  workdir = tmp_path_factory.mktemp('trained_10')
  train.train_and_evaluate(config_of(10), str(workdir))
  assert sorted(checkpoints.manager(str(workdir)).all_steps()) == [5, 10]
  return workdir


def copy_of(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path / 'w')
  return tmp_path / 'w'


def damage(step_dir, how: str, item: str = 'params') -> None:
  """Truncates, deletes or overwrites with random bytes the data files of one item of a checkpoint."""
  data_files = glob.glob(os.path.join(step_dir, item, 'ocdbt.process_0', 'd', '*'))
  assert data_files
  for path in data_files:
    if how == 'truncated':
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    elif how == 'deleted':
      os.remove(path)
    else:
      with open(path, 'wb') as f:
        f.write(np.random.default_rng(0).bytes(os.path.getsize(path) if os.path.exists(path) else 1000))


def tree_listing(directory) -> dict:
  """{relative path: (size, mtime_ns)} of every file and folder under directory."""
  listing = {}
  for root, dirs, names in os.walk(directory):
    for name in dirs + names:
      path = os.path.join(root, name)
      stat = os.stat(path)
      listing[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
  return listing


# The workdir lock.

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from diffusion_jax import workdir_lock
    lock = workdir_lock.LocalLock(sys.argv[1])
    lock.acquire()
    print('HELD', flush=True)
    time.sleep(600)
""")


@pytest.fixture
def lock_holder(tmp_path):
  """A process holding tmp_path/w's lock, as a training run does."""
  workdir = tmp_path / 'w'
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
  assert holder.stdout.readline().strip() == 'HELD'
  yield workdir, holder
  holder.kill()
  holder.wait()


def test_a_second_writer_is_refused_naming_the_holder(lock_holder):
  workdir, holder = lock_holder
  with pytest.raises(WorkdirError, match=rf'in use by another training run \(pid {holder.pid} on '
                                         rf'{socket.gethostname()} since .*train.lock\)'):
    train.train_and_evaluate(config_of(1), str(workdir))
  assert not os.path.exists(workdir / 'checkpoints') and not os.path.exists(workdir / 'config.json')


def test_reading_modes_need_no_lock_and_never_write_into_checkpoints(trained_10, tmp_path):
  workdir = copy_of(trained_10, tmp_path)
  holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == 'HELD'
    before = tree_listing(workdir / 'checkpoints')
    os.chmod(workdir / 'checkpoints', 0o555)  # Read-only too (not for root, whom the listing checks instead).
    config = config_of(10)
    config.sampling.compare_steps = (2, 4)
    out_dir = sample.sample_from_workdir(config, str(workdir))
    sample.compare_from_workdir(config, str(workdir))
  finally:
    os.chmod(workdir / 'checkpoints', 0o755)
    holder.kill()
    holder.wait()
  assert os.path.exists(os.path.join(out_dir, 'samples.npz'))
  assert tree_listing(workdir / 'checkpoints') == before


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  holder = {'host': socket.gethostname(), 'pid': int(gone.stdout), 'since': '2026-12-01T00:00:00+00:00'}
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(holder))  # Left by a run killed with -9.
  state = train.train_and_evaluate(config_of(2), str(workdir))
  assert int(state.step) == 2
  assert f'Took over the lock {workdir / workdir_lock.LOCK_FILE}' in caplog.text
  assert f'pid {holder["pid"]} on {holder["host"]} since 2026-12-01' in caplog.text
  assert (workdir / workdir_lock.LOCK_FILE).read_text() == ''  # Released on exit.


def test_object_store_lock_takes_over_only_dead_holders_of_this_host(tmp_path, caplog):
  """The gs:// lock (tried on a local folder): refused while its holder lives or is on another host."""
  path = tmp_path / workdir_lock.LOCK_FILE
  lock = workdir_lock.ObjectLock(str(tmp_path))
  for holder, taken in (({'host': socket.gethostname(), 'pid': os.getppid(), 'since': 'x'}, False),
                        ({'host': 'another-host', 'pid': 1, 'since': 'x'}, False),
                        ({'host': socket.gethostname(), 'pid': 2**22 + 1, 'since': 'x'}, True)):
    path.write_text(json.dumps(holder))
    if taken:
      lock.acquire()
      assert json.loads(path.read_text())['pid'] == os.getpid()
      assert 'Took over the lock' in caplog.text
      lock.release()
      assert not path.exists()
    else:
      with pytest.raises(WorkdirError, match=rf'pid {holder["pid"]} on {holder["host"]}.*If that run is gone, '
                                             rf'delete {path}'):
        lock.acquire()


# Checkpoints that do not restore.

@pytest.mark.parametrize('how', ['truncated', 'deleted', 'garbage'])
def test_training_walks_back_past_a_damaged_checkpoint_and_continues_identically(how, trained_10, straight_15,
                                                                                tmp_path, caplog):
  caplog.set_level('INFO')
  workdir = copy_of(trained_10, tmp_path)
  damage(workdir / 'checkpoints' / '10', how)
  state = train.train_and_evaluate(config_of(15), str(workdir))
  assert 'Cannot restore the checkpoint at step 10' in caplog.text
  assert 'Resumed from the checkpoint at step 5.' in caplog.text
  moved = glob.glob(str(workdir / 'checkpoints' / checkpoints.UNRESTORABLE / '10_*'))
  assert len(moved) == 1 and os.path.isdir(os.path.join(moved[0], 'params'))  # Renamed, not deleted.
  assert_same_state(state, straight_15)


def test_no_restorable_checkpoint_is_an_error_naming_every_step(trained_10, tmp_path):
  workdir = copy_of(trained_10, tmp_path)
  for step in (5, 10):
    damage(workdir / 'checkpoints' / str(step), 'garbage')
  with pytest.raises(CheckpointError, match=r'Cannot restore any checkpoint in .*\(step 10: .*; step 5: .*\)'):
    train.train_and_evaluate(config_of(15), str(workdir))
  assert sorted(checkpoints.manager(str(workdir)).all_steps()) == [5, 10]  # Nothing moved.


def test_sampling_walks_back_without_moving_and_a_requested_step_does_not(trained_10, tmp_path, caplog):
  workdir = copy_of(trained_10, tmp_path)
  damage(workdir / 'checkpoints' / '10', 'truncated', 'ema_params')  # What sampling restores.
  before = tree_listing(workdir / 'checkpoints')
  out_dir = sample.sample_from_workdir(config_of(10), str(workdir))
  assert out_dir.endswith('_step5') and 'Cannot restore the checkpoint at step 10' in caplog.text
  assert tree_listing(workdir / 'checkpoints') == before
  config = config_of(10)
  config.sampling.checkpoint_step = 10
  with pytest.raises(CheckpointError, match=r'Cannot restore the checkpoint at step 10 in .*checkpoints \(step 10: '):
    sample.sample_from_workdir(config, str(workdir))


# Saving fails.

def test_a_refused_checkpoint_write_is_a_workdir_error_and_the_previous_checkpoint_restores(trained_10, tmp_path,
                                                                                         monkeypatch):
  """The patched writer fails as orbax does when it may not create the step's folder (EACCES)."""
  workdir = copy_of(trained_10, tmp_path)

  def refused(self, step, *args, **kwargs):
    raise PermissionError(13, 'Permission denied', f'{self.directory}/{step}.orbax-checkpoint-tmp')
  monkeypatch.setattr(ocp.CheckpointManager, 'save', refused)
  with pytest.raises(WorkdirError, match=r'Cannot write the checkpoint of step 15 to .*checkpoints: Permission '
                                         r'denied\. The newest complete checkpoint is at step 10'):
    train.train_and_evaluate(config_of(15), str(workdir))
  monkeypatch.undo()
  exp = experiment.build(config_of(15))
  assert int(checkpoints.restore_train_state(checkpoints.manager(str(workdir)), exp.abstract_state).step) == 10


@pytest.mark.parametrize('error, reason', [
    (ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": [OS error: No space left on device]'),
     'No space left on device'),
    (RuntimeError('commit failed'), None)])
def test_background_write_errors_are_recognised_by_their_os_error(error, reason):
  try:
    try:
      raise error
    except Exception as e:
      raise RuntimeError('Failed to run 6 Handler Commit operations') from e
  except RuntimeError as wrapped:
    assert files.os_error_reason(wrapped) == reason


def test_an_output_file_is_never_left_half_written(tmp_path):
  path = tmp_path / 'out' / 'samples.npz'
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_write(str(path)) as f:
      f.write(b'half of it')
      raise KeyboardInterrupt
  assert os.listdir(tmp_path / 'out') == []
  with files.atomic_write(str(path)) as f:
    np.savez(f, images=np.arange(3))
  np.testing.assert_array_equal(np.load(path)['images'], np.arange(3))
  assert os.listdir(tmp_path / 'out') == ['samples.npz']


# Subprocesses: kills, signals, full and read-only disks, and main.py's one-line errors.

def run_fault(fault: str, *flags, **kwargs):
  return subprocess.Popen([sys.executable, FAULT_SCRIPT, fault, *flags], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kwargs)


def assert_one_line_error(returncode: int, stderr: str, *phrases: str) -> None:
  """Exit status 1; the last line of stderr is main.py's error with these phrases; no traceback anywhere."""
  assert returncode == 1, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('main.py: '), stderr[-3000:]
  for phrase in phrases:
    assert phrase in last, last


@pytest.mark.slow
def test_kill_during_sampling_leaves_no_partial_samples(trained_10, tmp_path):
  workdir = copy_of(trained_10, tmp_path)
  process = run_fault('slow_npz', *TINY, f'--workdir={workdir}', '--mode=sample',
                      '--config.sampling.num_samples=40', '--config.sampling.seed=7')
  assert process.stdout.readline().strip() == 'WRITING'  # Half of samples.npz is written.
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  out_dir = glob.glob(str(workdir / 'samples' / '*seed7_step10'))
  assert len(out_dir) == 1
  assert 'samples.npz' not in os.listdir(out_dir[0])
  assert any(name.startswith('.samples.npz.tmp-') for name in os.listdir(out_dir[0]))


@pytest.mark.slow
def test_sigterm_during_a_checkpoint_save_stops_and_the_next_run_resumes(straight_15, tmp_path):
  workdir = tmp_path / 'w'
  process = run_fault('slow_save', *TINY, f'--workdir={workdir}', '--config.training.num_train_steps=100000',
                      '--config.training.checkpoint_every_steps=5')
  assert process.stdout.readline().strip() == 'SAVING 5'
  process.send_signal(signal.SIGTERM)  # While step 5 is being written.
  _, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-3000:]
  steps = sorted(checkpoints.manager(str(workdir)).all_steps())
  assert steps[0] == 5 and steps[-1] < 15, steps
  state = train.train_and_evaluate(config_of(15), str(workdir))
  assert_same_state(state, straight_15)


def unshare_available() -> bool:
  return subprocess.run(['unshare', '-rm', 'true'], capture_output=True).returncode == 0 if shutil.which(
      'unshare') else False


def run_in_mount_namespace(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs a bash script as root of a new user and mount namespace (mounts there are seen by nothing else)."""
  return subprocess.run(['unshare', '-rm', 'bash', '-euc', script], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, JAX_PLATFORMS='cpu'))


@pytest.mark.slow
@pytest.mark.skipif(not unshare_available(), reason='needs `unshare -rm` (user namespaces) for a tiny file system')
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_restores(trained_10, straight_15, tmp_path):
  mount, workdir = tmp_path / 'tiny_fs', tmp_path / 'tiny_fs' / 'w'
  mount.mkdir()
  main = f'{sys.executable} main.py {" ".join(TINY)} --workdir={workdir} --config.training.checkpoint_every_steps=5'
  result = run_in_mount_namespace(f"""
      mount -t tmpfs -o size=8m tmpfs {mount}
      cp -r {trained_10} {workdir}
      fallocate -l $(( $(df --output=avail -B1 {mount} | tail -1) - 300000 )) {mount}/filler
      set +e; {main} --config.training.num_train_steps=15 2> {tmp_path}/full.log; echo $? > {tmp_path}/full.rc; set -e
      rm {mount}/filler
      {main} --config.training.num_train_steps=15 --config.training.log_every_steps=15 2> {tmp_path}/freed.log
      cp -r {workdir}/checkpoints/15 {tmp_path}/step15
      """)
  assert result.returncode == 0, result.stderr[-3000:] + (tmp_path / 'freed.log').read_text()[-3000:]
  assert_one_line_error(int((tmp_path / 'full.rc').read_text()), (tmp_path / 'full.log').read_text(),
                        'Cannot write the checkpoint of step 15', 'No space left on device',
                        'The newest complete checkpoint is at step 10')
  assert 'Resumed from the checkpoint at step 10.' in (tmp_path / 'freed.log').read_text()
  # The run resumed after freeing space ends where 15 steps straight end.
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'step15' / 'params',
                                                jax.tree.map(np.zeros_like, jax.device_get(straight_15.params)))
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(straight_15.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
@pytest.mark.skipif(not unshare_available(), reason='needs `unshare -rm` (user namespaces) for a read-only mount')
def test_a_read_only_workdir_is_one_line(tmp_path):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  result = run_in_mount_namespace(f"""
      mount --bind {workdir} {workdir} && mount -o remount,bind,ro {workdir}
      {sys.executable} main.py {" ".join(TINY)} --workdir={workdir} 2> {tmp_path}/ro.log || echo $? > {tmp_path}/ro.rc
      """)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_one_line_error(int((tmp_path / 'ro.rc').read_text()), (tmp_path / 'ro.log').read_text(),
                        f'Cannot write to the workdir {workdir}: Read-only file system')


@pytest.mark.slow
@pytest.mark.parametrize('flags, phrases', [
    (['--config.training.batch_size=abc'], ["flag --config.training.batch_size=abc: invalid literal for int()"]),
    (['--config.training.batch_sze=3'], ["--config.training.batch_sze: the config has no field 'batch_sze'; did you "
                                        'mean batch_size?']),
    (['--config.trainin.batch_size=3'], ["the config has no field 'trainin'; did you mean training?"]),
    (['--config=configs/no_such_config.py'], ['cannot read the config file --config=configs/no_such_config.py: no '
                                              'such file']),
    (['--config.sampling.method=foo'], ["Unknown sampler 'foo'; choose one of"]),
])
def test_configuration_errors_are_one_line(flags, phrases, tmp_path):
  result = subprocess.run([sys.executable, 'main.py', *TINY, f'--workdir={tmp_path}', *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert_one_line_error(result.returncode, result.stderr, *phrases)
  assert 'Pass --helpshort' not in result.stderr  # No absl usage text.


@pytest.mark.slow
def test_a_nan_loss_is_one_line_naming_the_step_and_the_last_checkpoint(tmp_path):
  for first_nan, where in ((2, 'no checkpoint has been written yet'),
                           (7, f'the last good checkpoint is at step 5 in {tmp_path}/checkpoints')):
    process = run_fault(f'nan_at_{first_nan}', *TINY, f'--workdir={tmp_path}', '--config.training.num_train_steps=10',
                        '--config.training.checkpoint_every_steps=5')
    _, err = process.communicate(timeout=300)
    assert_one_line_error(process.returncode, err, f'The loss is nan at step {first_nan}', where)


@pytest.mark.slow
def test_a_second_writer_is_one_line(lock_holder):
  workdir, holder = lock_holder
  result = subprocess.run([sys.executable, 'main.py', *TINY, f'--workdir={workdir}'], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert_one_line_error(result.returncode, result.stderr, f'pid {holder.pid} on {socket.gethostname()}',
                        'train into another --workdir')


def test_nan_loss_stops_in_process_with_the_checkpoint_kept(tmp_path, monkeypatch):
  real = train.TrainStep.__call__

  def poisoned(self, state, batch, rng):
    state, metrics = real(self, state, batch, rng)
    return state, dict(metrics, loss=np.nan if int(state.step) >= 3 else metrics['loss'])
  monkeypatch.setattr(train.TrainStep, '__call__', poisoned)
  with pytest.raises(NonFiniteLossError, match=r'The loss is nan at step 3.*last good checkpoint is at step 2'):
    train.train_and_evaluate(config_of(6, checkpoint_every=2), str(tmp_path))
  assert checkpoints.manager(str(tmp_path)).all_steps() == [2]
