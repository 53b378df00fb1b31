"""One writer per workdir: the lock that --mode=train holds on WORKDIR/train.lock while it runs.

A local workdir (also on NFS) is locked with a POSIX record lock (`fcntl.lockf`), which the kernel releases
when the holder exits in any way, kill -9 included; the file says who holds it (host, pid, since when) and
is emptied on a clean exit, so that a non-empty file found unlocked is the trace of a holder that died: it is
taken over with a warning. Object stores (gs://...) have no such lock: the file itself is the lock, written
after checking that there is none; it is stale, and taken over, only if its holder is a process of this host
that no longer exists. Its limits: two runs started within the time it takes to check and write the object
may both pass, and a lock left by a run of another host that died must be deleted by hand (the error names
the file).
In a multi-process run, process 0 takes the lock and every process learns whether it did.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Iterator

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from diffusion_jax.checks import WorkdirError

LOCK_FILE = 'train.lock'


def is_local(path: str) -> bool:
  return '://' not in path


def this_holder() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}


def describe(holder: dict) -> str:
  return f'pid {holder.get("pid")} on {holder.get("host")} since {holder.get("since")}'


def read_holder(text: str) -> dict | None:
  """The holder recorded in a lock file's text (None: empty, or not a lock written by this module)."""
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


def process_exists(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True  # Another user's process, or an unreadable pid: do not assume it is gone.
  return True


def locked_error(workdir: str, path: str, holder: dict | None) -> WorkdirError:
  who = describe(holder) if holder else 'another process'
  return WorkdirError(f'The workdir {workdir} is in use by another training run ({who}; lock {path}): wait for it '
                      'to finish or stop it, or train into another --workdir.')


class LocalLock:
  """The fcntl lock of a local workdir's lock file."""

  def __init__(self, workdir: str):
    self.workdir, self.path = workdir, os.path.join(workdir, LOCK_FILE)
    self.file = None

  def acquire(self) -> None:
    self.file = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EACCES, errno.EAGAIN):
        raise
      self.file.seek(0)
      holder = read_holder(self.file.read())
      self.file.close()
      raise locked_error(self.workdir, self.path, holder) from None
    self.file.seek(0)
    stale = read_holder(self.file.read())
    if stale:
      logging.warning('Took over the lock %s of a training run that ended without releasing it (%s).', self.path,
                      describe(stale))
    self._write(json.dumps(this_holder()))

  def release(self) -> None:
    self._write('')  # Empty: released cleanly.
    self.file.close()  # Closing releases the lock.

  def _write(self, text: str) -> None:
    self.file.seek(0)
    self.file.truncate()
    self.file.write(text)
    self.file.flush()
    os.fsync(self.file.fileno())


class ObjectLock:
  """The lock object of a workdir in an object store (see the module docstring for its limits)."""

  def __init__(self, workdir: str):
    self.workdir, self.path = workdir, epath.Path(workdir) / LOCK_FILE
    self.holder = None

  def acquire(self) -> None:
    if self.path.exists():
      holder = read_holder(self.path.read_text())
      mine = holder and holder.get('host') == socket.gethostname()
      # A restarted container may reuse the pid, even this process's: that holder is gone too.
      if not (mine and (holder.get('pid') == os.getpid() or not process_exists(holder.get('pid')))):
        raise WorkdirError(f'{locked_error(self.workdir, str(self.path), holder)} If that run is gone, delete '
                           f'{self.path}.')
      logging.warning('Took over the lock %s of a training run that is gone (%s).', self.path, describe(holder))
    self.holder = this_holder()
    self.path.write_text(json.dumps(self.holder))

  def release(self) -> None:
    if self.path.exists() and read_holder(self.path.read_text()) == self.holder:  # Not another run's lock.
      self.path.unlink()


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock for the duration of the block (process 0; every process raises if it fails).

  Raises a WorkdirError naming the holder when another run holds the lock, and naming the path when the
  workdir cannot be created or written.
  """
  lock = (LocalLock if is_local(workdir) else ObjectLock)(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      lock.acquire()
    except OSError as e:
      error = e if isinstance(e, WorkdirError) else WorkdirError(
          f'Cannot write to the workdir {workdir}: {e.strerror or e} ({lock.path}); choose a writable --workdir.')
      error.__cause__ = None if error is e else e
    except Exception as e:  # pylint: disable=broad-except  # E.g. an object store's own error: raised below,
      error = e             # with its traceback, after the other processes have learnt that it failed.
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      error = WorkdirError(f'Process 0 could not lock the workdir {workdir}; see its log.')
  if error is not None:
    raise error
  try:
    yield
  finally:
    if jax.process_index() == 0:
      try:
        lock.release()
      except OSError as e:  # Never hides the block's own error.
        logging.warning('Could not release the lock %s: %s', lock.path, e)
