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
  locked(workdir)                     one run per workdir: an exclusive `flock` on
                                      WORKDIR/.lock, which names its holder (pid, host)
  check_config_unchanged(workdir, config)   a resumed run must have the config that
                                      trained it (config.json), but for the fields
                                      of RESUMABLE_CHANGES

Checking up front does not make a disk that fills up mid-run harmless, but
what was written stays whole: Orbax commits a checkpoint by renaming its
temporary folder, and results and config files are replaced atomically.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import jax

MIN_FREE_BYTES = 64 * 2**20  # summaries, results and the file system's own slack


class WorkdirError(OSError):
  """The workdir cannot be written, or its disk is too full for the run."""

  def __str__(self) -> str:
    return str(self.strerror)  # the message, without OSError's "[Errno N]"


def _advice(workdir: str) -> str:
  return (
    f'Choose another --workdir (on a writable disk with free space), or make '
    f'{workdir!r} writable; nothing has been written.'
  )


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and proves that a file can be written in it.

  Raises:
    WorkdirError: naming the path and the operating system's reason.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    where = f' ({e.filename})' if e.filename and e.filename != workdir else ''
    raise WorkdirError(
      e.errno,
      f'cannot create the workdir {workdir!r}: {e.strerror or e}{where}. {_advice(workdir)}',
    ) from e
  probe = None
  try:
    fd, probe = tempfile.mkstemp(prefix='.write-probe-', dir=workdir)
    with os.fdopen(fd, 'wb') as f:
      f.write(b'\0' * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise WorkdirError(
      e.errno, f'cannot write in the workdir {workdir!r}: {e.strerror or e}. {_advice(workdir)}'
    ) from e
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
    raise WorkdirError(
      errno.ENOSPC,
      f'the disk of the workdir {workdir!r} has '
      f'{free / 2**20:.1f} MiB free; this run needs about '
      f'{needed / 2**20:.1f} MiB (its checkpoints). Free some space, '
      'lower config.keep_checkpoints, or choose another --workdir; '
      'nothing has been written.',
    )


def write_text_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same folder.

  On any failure (a full disk included) the temporary file is removed and the
  previous `path`, if any, is left as it was. The file gets the mode a plain
  `open(path, 'w')` would give it (0666 less the umask; `mkstemp`'s 0600 would
  hide config.json and eval_results.json from the other users of a machine).
  """
  write_atomically(path, lambda f: f.write(text.encode('utf-8')))


def write_atomically(path: str, write: Callable[[BinaryIO], Any]) -> None:
  """`write_text_atomically` for any content: `write(f)` fills the binary file f."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
  try:
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


# ------------------------------------------------------------------ lock ---

LOCK_FILE = '.lock'


class WorkdirLockedError(WorkdirError):
  """Another process holds the workdir's lock."""


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` (WORKDIR/.lock) for the `with` block.

  `fcntl.flock` is released by the kernel when its holder dies, however it dies
  (SIGKILL included), so the lock file a killed run leaves (naming a process
  that is gone) is taken over at once; its text only says who holds it. A run
  that ends removes the file. File systems without flock (ENOLCK, EOPNOTSUPP)
  run unlocked, with a warning.

  Raises:
    WorkdirLockedError: naming the holder's pid, host and start time.
  """
  from absl import logging

  path = os.path.join(workdir, LOCK_FILE)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        try:
          with open(path, encoding='utf-8', errors='replace') as f:
            holder = f.read().strip()
        except FileNotFoundError:  # released meanwhile: try again
          continue
        raise WorkdirLockedError(
          errno.EBUSY,
          f'the workdir {workdir!r} is in use by another run: '
          f'{holder or "a process that is starting"} (lock file {path}). Wait for it to '
          'end or stop it, or choose another --workdir.',
        ) from e
      logging.warning(
        'Cannot lock %s (%s); running without a lock: make sure no other run uses this workdir.',
        path,
        e.strerror or e,
      )
      yield
      return
    try:  # the file may have been removed (and re-created) by its last holder meanwhile
      same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    since = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on host {socket.gethostname()}, since {since}\n'.encode(), 0)
    yield
  finally:
    os.unlink(path)  # before the lock goes: a waiting run then re-opens the new file
    os.close(fd)


# ------------------------------------------------ config of a resumed run ---

# Fields a resumed (or finished) run may change: they do not change what the
# checkpoints hold or how training goes on from them. Evaluation, cadence, where
# the data are read from and the ImageNet file (read at a fresh start only).
# An entry ending in '.' covers a whole section.
RESUMABLE_CHANGES = (
  'eval.',
  'data.eval_batch_size',
  'data.eval_flip',
  'model.embedding',
  'log_every_steps',
  'checkpoint_every_steps',
  'eval_every_steps',
  'keep_checkpoints',
  'profile',
  'data.prefetch',
  'data.manual_dir',
  'data.data_dir',
  'model.pretrained',
  'model.remat',  # recomputation only: the same step, less memory
  'model.remat_nested',
)


class ConfigChangedError(ValueError):
  """A run is resumed with a config that differs from the one that trained it."""


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def _resumable(field: str) -> bool:
  return any(field == f or (f.endswith('.') and field.startswith(f)) for f in RESUMABLE_CHANGES)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """`field: run=X, now=Y` for every field outside RESUMABLE_CHANGES that differs.

  Fields the saved config lacks (written by an older version) are not compared.
  """
  old, new = _flatten(saved), _flatten(current)
  return [
    f'{field}: run={old[field]!r}, now={new.get(field, "<missing>")!r}'
    for field in sorted(old)
    if not _resumable(field) and old[field] != new.get(field)
  ]


def check_config_unchanged(workdir: str, config: Any) -> None:
  """Refuses to resume a run with another config than its WORKDIR/config.json.

  Raises:
    ConfigChangedError: listing every differing field; nothing is written.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return  # a run of an older version, or config.json removed: nothing to compare
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  differences = config_differences(saved, json.loads(config.to_json_best_effort()))
  if differences:
    raise ConfigChangedError(
      f'the workdir {workdir!r} was trained with another config ({path}); differing: '
      + '; '.join(differences)
      + '. Resume with the config that trained it, or start '
      'another --workdir. Only evaluation, logging and checkpoint cadence, data paths, '
      'model.pretrained and model.remat(_nested) may change on a resumed run.'
    )


def plain_file_mode() -> int:
  """The mode `open(path, 'w')` gives a new file: 0666 less the umask."""
  return 0o666 & ~_umask()


def _umask() -> int:
  """The process's umask (read by setting it and setting it back)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask
