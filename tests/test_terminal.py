"""The quiet terminal's filter: cal_jax's own warnings, every error, nothing else."""

import logging
import os

from cal_jax import terminal


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
