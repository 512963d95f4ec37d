"""The quiet terminal's filter: cal_jax's own warnings, every error, nothing else."""

import logging
import os

from cal_jax.runtime import terminal


def record(pathname, level=logging.WARNING, name='absl', message='m'):
  return logging.LogRecord(name, level, pathname, 1, message, None, None)


def test_own_warnings_pass_and_a_library_inside_a_checkout_named_cal_jax_does_not():
  keep = terminal._TerminalFilter().filter
  own = os.path.join(terminal.PACKAGE_DIR, 'data', 'splits.py')
  # A checkout whose folder is named cal_jax, with its virtual environment inside it.
  library = os.path.join(
    os.sep,
    'elsewhere',
    'cal_jax',
    '.venv',
    'lib',
    'tensorflow_datasets',
    'core',
    'utils',
    'file_utils.py',
  )
  assert keep(record(own))
  assert not keep(record(own, logging.INFO))
  assert not keep(record(library))
  assert keep(record(library, logging.ERROR))
  assert keep(record('/x/warnings.py', name='py.warnings', message=f'{own}:3: UserWarning: w'))
  assert not keep(record('/x/warnings.py', name='py.warnings', message=f'{library}:3: Warn'))


def test_a_throughput_below_one_per_second_keeps_its_decimals():
  from cal_jax.runtime import terminal

  rates = [terminal.format_rate(x) for x in (0.0, 0.004, 0.37, 1.0, 412.4)]
  assert rates == ['0', '0.004', '0.37', '1', '412']


def test_a_library_s_errors_about_a_full_disk_stay_off_the_terminal(tmp_path):
  """The command reports a full disk in one line; a library's error records about it
  (with the ENOSPC in the message or the exception's chain) go to log.txt only; and
  a log.txt that cannot be written drops the record rather than print a traceback."""
  import errno
  import io
  import sys

  keep = terminal._TerminalFilter().filter
  library = '/site-packages/clu/asynclib.py'
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  try:
    try:
      raise full
    except OSError as error:
      raise RuntimeError('Error in producer thread for AsyncWriter') from error
  except RuntimeError:
    wrapped = logging.LogRecord('absl', logging.ERROR, library, 1, 'producer', None, sys.exc_info())
  assert not keep(wrapped)
  assert not keep(record(library, logging.ERROR, message='write: No space left on device'))
  assert keep(record(library, logging.ERROR, message='another error'))
  own = os.path.join(terminal.PACKAGE_DIR, 'training', 'loop.py')
  assert keep(record(own, logging.ERROR, message='No space left on device'))

  class FullDisk(io.StringIO):
    def write(self, text):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  handler = terminal._LogFile(str(tmp_path / 'log.txt'))
  handler.stream = FullDisk()
  stderr, sys.stderr = sys.stderr, io.StringIO()
  try:
    handler.emit(record(own, logging.WARNING))
    printed = sys.stderr.getvalue()
  finally:
    sys.stderr = stderr
  assert printed == ''
