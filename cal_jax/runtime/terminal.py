"""What a run shows on the terminal, and WORKDIR/log.txt, which keeps everything.

By default the terminal gets the lines the code marks with `say` (the data,
one line per log interval, checkpoints, resuming), cal_jax's own warnings,
any library's errors, and what is printed to stdout (the results table). The
rest (tfds reader lines, Orbax and TensorStore INFO, clu's metric lines, and
the native start-up notices of TensorFlow and XLA, such as oneDNN's) goes to
WORKDIR/log.txt with everything the terminal shows. ``verbose`` shows it all
on the terminal as before.

How: `quiet_start` moves file descriptor 2 (where native code writes) to a
temporary file before the libraries load, and points Python's stderr and
absl's handler at a copy of the terminal. `attach_log_file(workdir)`, called
once the workdir is known to be writable, writes what was held back into
WORKDIR/log.txt, points descriptor 2 there, and adds a file handler for every
Python log record. The loop calls it once the run is accepted (its checkpoint
restored, config.json written), so a refused run writes nothing into the
workdir. A native crash's message therefore lands in log.txt; the
terminal then shows the exit status only.
"""

from __future__ import annotations

import errno
import io
import logging as logging_std
import os
import sys
import tempfile
from typing import Any

from absl import logging

TERMINAL = 'cal_jax_terminal'  # a log record's `extra` key: show it on the terminal
LOG_FILE = 'log.txt'


def format_rate(per_second: float) -> str:
  """A throughput for people: '412', or with decimals below 1 ('0.37', not '0')."""
  return f'{per_second:.0f}' if per_second >= 1 or per_second == 0 else f'{per_second:.2g}'


def say(message: str, *args: Any) -> None:
  """Logs `message` at INFO, and shows it on the terminal in the quiet mode too."""
  logging.info(message, *args, extra={TERMINAL: True})


def format_duration(seconds: float) -> str:
  """'45s', '6m05s', '2h03m': the ETAs of training, evaluation and the ablation grid."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # .../cal_jax/


class _TerminalFilter(logging_std.Filter):
  """The records of the quiet terminal: marked ones, cal_jax's warnings, all errors
  (a library's error about a full disk only in log.txt)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    if getattr(record, TERMINAL, False):
      return True
    # By the package's own folder: a checkout named cal_jax holding its .venv would
    # otherwise claim every library's warnings.
    own = record.pathname.startswith(PACKAGE_DIR)
    if record.levelno >= logging_std.ERROR:  # but a library's report of a full disk: the
      return own or not _disk_full(record)  # command says that in its one line
    if record.name == 'py.warnings':  # warnings.warn: the message names the file
      own = PACKAGE_DIR in record.getMessage()
    return own and record.levelno >= logging_std.WARNING


def _disk_full(record: logging_std.LogRecord) -> bool:
  """Whether the record reports an ENOSPC (in its message or its exception's chain)."""
  if 'No space left on device' in record.getMessage():
    return True
  error, seen = record.exc_info[1] if record.exc_info else None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if getattr(error, 'errno', None) == errno.ENOSPC or 'No space left on device' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class _LogFile(logging_std.FileHandler):
  """WORKDIR/log.txt; a record it cannot write (the disk is full) is dropped, not
  reported with a traceback on the terminal for each line."""

  def handleError(self, record: logging_std.LogRecord) -> None:
    del record


class _Short(logging_std.Formatter):
  """'12:41:29 step 2/8 ...' (and 'WARNING: ' or 'ERROR: ' before the message)."""

  def __init__(self):
    super().__init__('%(asctime)s %(message)s', datefmt='%H:%M:%S')

  def format(self, record: logging_std.LogRecord) -> str:
    text = super().format(record)
    if record.name == 'py.warnings':  # the warning's line; its source line is in the log
      text = text.splitlines()[0]
    if record.levelno >= logging_std.WARNING:
      stamp, _, message = text.partition(' ')
      text = f'{stamp} {record.levelname}: {message}'
    return text


class _State:
  def __init__(self):
    self.held: Any = None  # the temporary file descriptor 2 writes to, until log.txt
    self.records: list[logging_std.LogRecord] = []
    self.buffer: logging_std.Handler | None = None
    self.file: str | None = None


_state = _State()


class _Hold(logging_std.Handler):
  """Keeps records until log.txt exists."""

  def emit(self, record: logging_std.LogRecord) -> None:
    _state.records.append(record)


def quiet_start() -> None:
  """The quiet terminal, before TensorFlow and JAX load (module docstring)."""
  if _state.held is not None:
    return
  sys.stderr.flush()
  terminal = os.dup(2)
  _state.held = tempfile.TemporaryFile()
  os.dup2(_state.held.fileno(), 2)
  sys.stderr = io.TextIOWrapper(os.fdopen(terminal, 'wb', buffering=0), write_through=True)
  handler = logging.get_absl_handler()
  handler.python_handler.stream = sys.stderr
  handler.python_handler.setFormatter(_Short())
  handler.addFilter(_TerminalFilter())
  _state.buffer = _Hold(level=logging_std.DEBUG)
  logging_std.getLogger().addHandler(_state.buffer)
  logging_std.captureWarnings(True)  # library warnings to the log, not the terminal


def attach_log_file(workdir: str, process_index: int = 0) -> str | None:
  """WORKDIR/log.txt from now on (appended to on a resume); returns its path.

  Process i > 0 of a multi-host run writes log.process{i}.txt. A no-op in the
  verbose mode, or when called again for the same workdir.
  """
  if _state.held is None:
    return None
  name = LOG_FILE if process_index == 0 else f'log.process{process_index}.txt'
  path = os.path.join(workdir, name)
  if _state.file == path:
    return path
  formatter = logging.PythonFormatter()
  with open(path, 'ab') as f:
    _state.held.flush()
    _state.held.seek(0)
    f.write(_state.held.read())  # the native notices of the start-up
    for record in _state.records:
      f.write((formatter.format(record) + '\n').encode('utf-8', 'replace'))
  _state.records.clear()
  log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
  os.dup2(log, 2)
  os.close(log)
  file_handler = _LogFile(path, encoding='utf-8')
  file_handler.setFormatter(formatter)
  file_handler.setLevel(logging_std.DEBUG)
  root = logging_std.getLogger()
  root.addHandler(file_handler)  # first: a root without handlers gets basicConfig's stderr one
  if _state.buffer is not None:
    root.removeHandler(_state.buffer)
    _state.buffer = None
  _state.file = path
  return path
