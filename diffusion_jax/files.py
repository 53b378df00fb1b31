"""Output files written whole, and the I/O errors a user can act on.

atomic_write writes to a temporary name beside the target, then renames it onto the target: a kill or a crash
during a write leaves at most a `.*.tmp-*` file, never a truncated file under the final name (a rename within
one file system is atomic).
"""
import contextlib
import errno
import os
import tempfile
from typing import BinaryIO, Iterator

from diffusion_jax.checks import WorkdirError

# The errors of a workdir that cannot be written, by what a user sees.
WRITE_ERRORS = {errno.ENOSPC: 'No space left on device', errno.EDQUOT: 'Disk quota exceeded',
                errno.EACCES: 'Permission denied', errno.EPERM: 'Operation not permitted',
                errno.EROFS: 'Read-only file system'}


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[BinaryIO]:
  """Yields a binary file that becomes `path` (folders created) when the block ends without an exception."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, prefix=f'.{os.path.basename(path)}.tmp-', delete=False) as f:
    try:
      yield f
      f.flush()
      os.fsync(f.fileno())
    except BaseException:
      f.close()
      os.remove(f.name)
      raise
  os.chmod(f.name, 0o644)  # NamedTemporaryFile creates it 0600.
  os.replace(f.name, path)


def write_text(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with atomic_write(path) as f:
    f.write(text.encode())


def os_error_reason(error: BaseException | None) -> str | None:
  """'No space left on device' etc. when error, or an error it was raised from, is one of WRITE_ERRORS, else None."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in WRITE_ERRORS:
      return error.strerror or WRITE_ERRORS[error.errno]
    for reason in WRITE_ERRORS.values():  # TensorStore's errors carry the OS error in their message only.
      if reason in str(error):
        return reason
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def write_errors(workdir: str) -> Iterator[None]:
  """Turns a WRITE_ERRORS OSError on a file of workdir raised in the block into a WorkdirError naming the file and
  the reason (other errors, e.g. of a dataset or a cache, keep their traceback)."""
  try:
    yield
  except OSError as e:
    reason = os_error_reason(e)
    inside = e.filename and os.path.abspath(str(e.filename)).startswith(os.path.abspath(workdir))
    if reason is None or not inside or isinstance(e, WorkdirError):
      raise
    raise WorkdirError(f'Cannot write {e.filename}: {reason}; free space or fix the permissions, or choose another '
                       '--workdir.') from e
