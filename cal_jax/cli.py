"""What the command lines share: bad input reported in one message naming what to
fix (the file, field or value), with exit status 1 and no traceback.

  USER_ERRORS          what bad input raises: data set layout, unreadable images,
                       config values, checkpoints and pretrained files of another
                       network (ValueError); missing files, unwritable or full disks
                       (OSError); non-finite losses (FloatingPointError)
  parse_flags          absl's flag parsing, with a misspelt config field reported
                       as a flag error like any other
  exit_with(program, error)   the one-line exit (`--v=1` also logs the traceback)
  absolute_path(path)  a path typed on the command line, resolved once against the
                       directory the command was started in ('' stays '')
  resolve_config_paths(config)   the same for every path field of a config
"""

import os
import re
import sys
from typing import NoReturn

from absl import app, logging
import ml_collections

USER_ERRORS = (ValueError, OSError, FloatingPointError)


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flags_parser: ml_collections reports an override of a config
  field that does not exist as an AttributeError from deep inside absl's
  parser; it becomes a 'FATAL Flags parsing error' naming the argument."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    cause = error.args[0] if isinstance(error, AttributeError) and error.args else error
    text = str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause)
    field = re.match(r"'([^']+)'", text)
    named = [a for a in argv[1:] if field and a.startswith('--config.')
             and re.search(rf'\.{re.escape(field[1])}(=|\.|$)', a)]
    where = f' in {named[0]}' if named else ''
    sys.exit(f'FATAL Flags parsing error: no config field {text.splitlines()[0]}{where}. '
             + ' '.join(text.splitlines()[1:]))


def exit_with(program: str, error: BaseException) -> NoReturn:
  logging.debug('%s failed', program, exc_info=error)
  sys.exit(f'{program}: error: {error}')


# Every config field that holds a path a user types (resolved by `resolve_config_paths`).
CONFIG_PATH_FIELDS = ('data.manual_dir', 'data.data_dir', 'model.pretrained',
                      'eval.rand_perm_path')


def absolute_path(path: str | None) -> str | None:
  """`path` with `~` expanded, made absolute against the current directory.

  Orbax refuses relative checkpoint paths, and a relative path would change
  meaning if any code changed directory: so each path a user types is
  resolved once, where the command line is read. '' and None stay as they are.
  """
  if not path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_config_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Makes every path field of `config` (CONFIG_PATH_FIELDS) absolute, in place."""
  for field in CONFIG_PATH_FIELDS:
    section, name = field.split('.')
    if section in config and name in config[section]:
      config[section][name] = absolute_path(config[section][name])
  return config
