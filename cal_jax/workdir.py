"""The run's folder: checked before any work, written without losing what is in it.

  check_writable(workdir)             creates it and writes (then removes) a probe
                                      file: a read-only disk, a path under a file
                                      or a missing permission fails at once, with
                                      the path named
  check_free_space(workdir, needed)   `os.statvfs`: refuses to start when the disk
                                      cannot hold the run's checkpoints
  run_bytes(state, keep)              what a run needs: keep + 2 checkpoints (the
                                      kept ones, the best, one being written)
  write_text_atomically(path, text)   temporary file, fsync, `os.replace`: a reader
                                      (or a later run) sees the old file or the new
                                      one, never a truncated one, also on a full disk

Checking up front does not make a disk that fills up mid-run harmless, but
what was written stays whole: Orbax commits a checkpoint by renaming its
temporary folder, and results and config files are replaced atomically.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Any

import jax

MIN_FREE_BYTES = 64 * 2**20  # summaries, results and the file system's own slack


class WorkdirError(OSError):
  """The workdir cannot be written, or its disk is too full for the run."""

  def __str__(self) -> str:
    return str(self.strerror)  # the message, without OSError's "[Errno N]"


def _advice(workdir: str) -> str:
  return (f'Choose another --workdir (on a writable disk with free space), or make '
          f'{workdir!r} writable; nothing has been written.')


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and proves that a file can be written in it.

  Raises:
    WorkdirError: naming the path and the operating system's reason.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    where = f' ({e.filename})' if e.filename and e.filename != workdir else ''
    raise WorkdirError(e.errno, f'cannot create the workdir {workdir!r}: '
                       f'{e.strerror or e}{where}. {_advice(workdir)}') from e
  probe = None
  try:
    fd, probe = tempfile.mkstemp(prefix='.write-probe-', dir=workdir)
    with os.fdopen(fd, 'wb') as f:
      f.write(b'\0' * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise WorkdirError(e.errno, f'cannot write in the workdir {workdir!r}: '
                       f'{e.strerror or e}. {_advice(workdir)}') from e
  finally:
    if probe and os.path.exists(probe):
      os.unlink(probe)


def free_bytes(path: str) -> int:
  """Bytes an unprivileged process may still write on the disk of `path`."""
  stats = os.statvfs(path)
  return stats.f_bavail * stats.f_frsize


def state_bytes(state: Any) -> int:
  """Bytes of one checkpoint of `state` (every array leaf)."""
  return sum(int(getattr(x, 'nbytes', 0)) for x in jax.tree_util.tree_leaves(state))


def run_bytes(state: Any, keep: int) -> int:
  """Disk a training run needs: keep + 2 checkpoints and `MIN_FREE_BYTES`."""
  return (keep + 2) * state_bytes(state) + MIN_FREE_BYTES


def check_free_space(workdir: str, needed: int) -> None:
  """Raises WorkdirError when the disk of `workdir` has less than `needed` bytes free."""
  free = free_bytes(workdir)
  if free < needed:
    raise WorkdirError(errno.ENOSPC, f'the disk of the workdir {workdir!r} has '
                       f'{free / 2**20:.1f} MiB free; this run needs about '
                       f'{needed / 2**20:.1f} MiB (its checkpoints). Free some space, '
                       'lower config.keep_checkpoints, or choose another --workdir; '
                       'nothing has been written.')


def write_text_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same folder.

  On any failure (a full disk included) the temporary file is removed and the
  previous `path`, if any, is left as it was.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
