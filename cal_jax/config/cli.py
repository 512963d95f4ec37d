"""What the command lines share: bad input reported in one message naming what to
fix (the file, field or value), with exit status 1 and no traceback.

  USER_ERRORS          what bad input raises: data set layout, unreadable images,
                       config values, checkpoints and pretrained files of another
                       network (ValueError); missing files, unwritable or full disks
                       (OSError); non-finite losses (FloatingPointError)
  parse_flags          absl's flag parsing, with a misspelt config field reported
                       as a flag error like any other, and a config file that
                       cannot be loaded (syntax error, failing import, no
                       get_config, get_config raising or returning something
                       else than a ConfigDict) in one line naming the file
                       and then `config.formulation` resolved
                       (`formulations.resolve`): a formulation given on the command
                       line is applied before the other --config.FIELD values
  check_config_file(path)   that load, on its own
  config_file_kind(path)    'python' (a .py file, executed) or 'run' (a run's
                       config.json, read as data into a ConfigDict); anything
                       else is refused before it is executed or read
  RunConfigParser      the `--config` parser of every command: ml_collections'
                       for a .py file, JSON for a run's config.json
  exit_with(program, error)   the one-line exit (`--v=1` also logs the traceback)
  absolute_path(path)  a path typed on the command line, resolved once against the
                       directory the command was started in ('' stays '')
  resolve_config_paths(config)   the same for every path field of a config
"""

import importlib.machinery
import importlib.util
import os
import re
import sys
import textwrap
import traceback
from typing import NoReturn

import ml_collections
from absl import flags, logging
from ml_collections.config_flags import config_flags as config_flags_lib

from cal_jax.config import formulations
from cal_jax.config.run_config import ConfigFileError, read_run_config

USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _where(error: BaseException, path: str) -> str:
  """', line N' of the innermost frame of `error` in the file `path`, or ''."""
  lines = [
    frame.lineno
    for frame in traceback.extract_tb(error.__traceback__)
    if os.path.abspath(frame.filename) == os.path.abspath(path)
  ]
  return f', line {lines[-1]}' if lines else ''


def config_file_kind(argument: str) -> str:
  """'python' for a Python config file, 'run' for a run's config.json; nothing
  of the file is executed, and a .json file is only read as JSON.

  Raises:
    ConfigFileError: no such file, a folder, or any other kind of file.
  """
  path, *args = argument.split(':', 1)
  shown = repr(path)
  if not os.path.exists(path):
    raise ConfigFileError(
      f'config file {shown} does not exist (--config takes the path of a '
      "Python file, e.g. configs/sysu.py, or a run's config.json)"
    )
  if not os.path.isfile(path):
    raise ConfigFileError(f'config file {shown} is a folder, not a Python file')
  suffix = os.path.splitext(path)[1].lower()
  if suffix == '.py':
    return 'python'
  if suffix != '.json':
    raise ConfigFileError(
      f"config file {shown} is neither a Python config (.py) nor a run's config.json; "
      'it was not run: pass a file like configs/sysu.py, or WORKDIR/config.json'
    )
  if args:
    raise ConfigFileError(
      f"config file {shown}: a run's config.json takes no ':{args[0]}' argument"
    )
  read_run_config(path)
  return 'run'


class RunConfigParser(config_flags_lib.ConfigFileFlagParser):
  """`--config`: a Python config file as ml_collections loads it, or a run's
  config.json read as data; any other file is refused before it is run."""

  def parse(self, path):
    if not isinstance(path, str):  # a ConfigDict given as the default
      return super().parse(path)
    if config_file_kind(path) == 'python':
      return super().parse(path)
    config = read_run_config(path)
    if self._lock_config:
      config.lock()
    return config


def use_run_config_parser(name: str) -> None:
  """Makes the config-file flag `name` parse with `RunConfigParser`."""
  flag = flags.FLAGS[name]
  flag.parser = RunConfigParser(name=name, lock_config=getattr(flag.parser, '_lock_config', True))


def check_config_file(argument: str) -> None:
  """Loads a config file as ml_collections' `--config` flag does, and says in one
  message why it cannot be used (raises ConfigFileError), naming the file.

  `argument` is the flag's value: a path, optionally followed by ':' and the
  argument of a parameterised `get_config(arg)`.
  """
  if config_file_kind(argument) == 'run':
    return
  path, *args = argument.split(':', 1)
  shown = repr(path)
  try:
    with open(path, 'rb') as f:
      source = f.read()
  except OSError as error:
    raise ConfigFileError(f'cannot read the config file {shown}: {error.strerror}') from error
  try:
    code = compile(source, path, 'exec')
  except (SyntaxError, ValueError) as error:
    line = f', line {error.lineno}' if getattr(error, 'lineno', None) else ''
    raise ConfigFileError(
      f'config file {shown}{line}: {type(error).__name__}: '
      f'{getattr(error, "msg", None) or error}; fix the file'
    ) from error
  loader = importlib.machinery.SourceFileLoader('_cal_jax_config_check', path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  module.__file__ = path
  try:
    exec(code, module.__dict__)
  except SystemExit as error:
    raise ConfigFileError(
      f'config file {shown}{_where(error, path)}: importing it exited '
      f'(SystemExit: {error.code}); a config file defines get_config() and exits nowhere'
    ) from error
  except Exception as error:
    raise ConfigFileError(
      f'config file {shown}{_where(error, path)}: importing it failed: '
      f'{type(error).__name__}: {error}'
    ) from error
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    raise ConfigFileError(
      f'config file {shown} has no get_config() function: a config file '
      'defines get_config() returning an ml_collections.ConfigDict (see '
      'configs/default.py)'
    )
  try:
    config = get_config(*args)
  except SystemExit as error:
    raise ConfigFileError(
      f'config file {shown}{_where(error, path)}: get_config() exited (SystemExit: '
      f'{error.code}) instead of returning an ml_collections.ConfigDict; fix the file'
    ) from error
  except Exception as error:
    raise ConfigFileError(
      f'config file {shown}{_where(error, path)}: get_config('
      f'{", ".join(map(repr, args))}) raised {type(error).__name__}: '
      f'{error}'
    ) from error
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigFileError(
      f'config file {shown}: get_config() returned '
      f'{"None" if config is None else "a " + type(config).__name__}, not an '
      'ml_collections.ConfigDict (a missing return statement?)'
    )


def _is_config_file_flag(flag: flags.Flag) -> bool:
  return isinstance(getattr(flag, 'parser', None), config_flags_lib.ConfigFileFlagParser)


def _config_file_arguments(argv: list[str]) -> list[tuple[str, str]]:
  """(flag name, value) of every config-file flag given in `argv`."""
  names = [name for name in flags.FLAGS if _is_config_file_flag(flags.FLAGS[name])]
  found = []
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--':
      break
    for name in names:
      for dashes in ('--', '-'):
        if arg.startswith(f'{dashes}{name}='):
          found.append((name, arg.split('=', 1)[1]))
        elif arg == f'{dashes}{name}' and i + 1 < len(argv):
          found.append((name, argv[i + 1]))
  return found


def _exit_for_config_file(argv: list[str]) -> None:
  """Exits with one line if a config file of `argv` cannot be loaded."""
  for name, value in _config_file_arguments(argv):
    try:
      check_config_file(value)
    except ConfigFileError as error:
      logging.debug('--%s=%s cannot be loaded', name, value, exc_info=error)
      sys.exit(f'FATAL Flags parsing error: --{name}: {error}')


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flags_parser: ml_collections reports an override of a config
  field that does not exist as an AttributeError from deep inside absl's
  parser; it becomes a 'FATAL Flags parsing error' naming the argument.
  A config file that cannot be loaded (whatever it raises while absl parses,
  or a get_config() that returns something else than a ConfigDict) is
  loaded again by `check_config_file`, which names the file and the problem.
  Every config-file flag parses with `RunConfigParser`, and a file that is
  neither a .py config nor a run's config.json is refused before it is run."""
  for name in flags.FLAGS:
    if _is_config_file_flag(flags.FLAGS[name]):
      use_run_config_parser(name)
  for name, value in _config_file_arguments(argv):
    try:
      config_file_kind(value)
    except ConfigFileError as error:
      sys.exit(f'FATAL Flags parsing error: --{name}: {error}')
  try:
    remaining = flags.FLAGS(argv)
  except SystemExit:  # a config file that exits while it is loaded
    _exit_for_config_file(argv)
    raise
  except flags.Error as error:  # absl's report, unless the config file is the cause
    _exit_for_config_file(argv)
    message = str(error)
    if '\n' in message:
      message = '\n' + textwrap.indent(message, '  ')
    sys.exit(f'FATAL Flags parsing error: {message} (--helpfull lists the flags)')
  except (AttributeError, KeyError) as error:
    _exit_for_config_file(argv)  # e.g. no get_config: not a misspelt field
    cause = error.args[0] if isinstance(error, AttributeError) and error.args else error
    text = str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause)
    field = re.match(r"'([^']+)'", text)
    named = [
      a
      for a in argv[1:]
      if field and a.startswith('--config.') and re.search(rf'\.{re.escape(field[1])}(=|\.|$)', a)
    ]
    where = f' in {named[0]}' if named else ''
    sys.exit(
      f'FATAL Flags parsing error: no config field {text.splitlines()[0]}{where}. '
      + ' '.join(text.splitlines()[1:])
    )
  except Exception:
    _exit_for_config_file(argv)  # a syntax error, a failing import, get_config raising
    raise
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if (
      _is_config_file_flag(flag)
      and flag.present
      and not isinstance(flag.value, ml_collections.ConfigDict)
    ):
      _exit_for_config_file(argv)  # get_config() returned another type, or the file is absent
    if _is_config_file_flag(flag) and isinstance(flag.value, ml_collections.ConfigDict):
      try:
        formulations.resolve(flag.value, overridden_fields(argv, name))
      except ValueError as error:
        sys.exit(f'FATAL Flags parsing error: --{name}.formulation: {error}')
  return remaining


def overridden_fields(argv: list[str], name: str = 'config') -> list[str]:
  """The fields given as --NAME.FIELD=VALUE (or --NAME.FIELD VALUE) in `argv`, in order."""
  fields = []
  for arg in argv[1:]:
    if arg == '--':
      break
    for dashes in ('--', '-'):
      if arg.startswith(f'{dashes}{name}.'):
        fields.append(arg[len(dashes) + len(name) + 1 :].split('=', 1)[0])
  return fields


def exit_with(program: str, error: BaseException) -> NoReturn:
  logging.debug('%s failed', program, exc_info=error)
  sys.exit(f'{program}: error: {error}')


# Every config field that holds a path a user types (resolved by `resolve_config_paths`).
CONFIG_PATH_FIELDS = ('data.manual_dir', 'data.data_dir', 'model.pretrained', 'eval.rand_perm_path')


def absolute_path(path: str | None) -> str | None:
  """`path` with `~` expanded, made absolute against the current directory.

  Orbax refuses relative checkpoint paths, and a relative path would change
  meaning if any code changed directory: so each path a user types is
  resolved once, where the command line is read. '' and None stay as they are.
  """
  if not path:
    return path
  return os.path.abspath(os.path.expanduser(path))


# Values of a path field that are words, not paths ('none': from scratch, on purpose).
CONFIG_PATH_WORDS = {'model.pretrained': ('none',)}


def resolve_config_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Makes every path field of `config` (CONFIG_PATH_FIELDS) absolute, in place."""
  for field in CONFIG_PATH_FIELDS:
    section, name = field.split('.')
    if section in config and name in config[section]:
      if config[section][name] not in CONFIG_PATH_WORDS.get(field, ()):
        config[section][name] = absolute_path(config[section][name])
  return config
