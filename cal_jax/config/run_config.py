"""A run's `config.json` (what training writes into its workdir), read back as a config.

  read_run_config(path)        the file as a ConfigDict, completed from the defaults
  read_workdir_config(workdir)  WORKDIR/config.json, or one line saying what to pass instead
  complete(saved)              a saved config with every field it lacks taken from
                               configs/default.py: the one place an older run's file is
                               brought up to date, so no reader needs a default of its own

The file is read as data (JSON), never executed. A field that a run of an older version
did not write takes the value configs/default.py gives it today; a field the defaults do
not know stays, and the config checks name it.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

# The sections of every config (configs/default.py), so of every run's config.json.
RUN_CONFIG_SECTIONS = ('data', 'model', 'loss', 'optim', 'eval')
CONFIG_FILE = 'config.json'


class ConfigFileError(ValueError):
  """A config file that cannot be loaded into a ConfigDict."""


def _overlay(defaults: dict[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
  merged = dict(defaults)
  for key, value in saved.items():
    if isinstance(value, Mapping) and isinstance(defaults.get(key), dict):
      merged[key] = _overlay(defaults[key], value)
    else:
      merged[key] = value
  return merged


def complete(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`saved` with every field it lacks taken from configs/default.py."""
  from configs import default  # the defaults' one home

  return ml_collections.ConfigDict(_overlay(default.get_config().to_dict(), saved))


def read_run_config(path: str) -> ml_collections.ConfigDict:
  """A run's config.json as a ConfigDict, completed from the defaults (`complete`).

  Raises:
    ConfigFileError: unreadable, not JSON, or not a run's config.
  """
  shown = repr(path)
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except OSError as error:
    raise ConfigFileError(f'cannot read the config file {shown}: {error.strerror}') from error
  except ValueError as error:
    raise ConfigFileError(
      f"config file {shown} is not JSON ({error}): pass a run's config.json as training "
      'wrote it, or a Python config file'
    ) from None
  missing = [s for s in RUN_CONFIG_SECTIONS if not isinstance(saved, dict) or s not in saved]
  if missing or not all(isinstance(saved[s], dict) for s in RUN_CONFIG_SECTIONS):
    raise ConfigFileError(
      f"config file {shown} is not a run's config.json (it has no "
      f'{", ".join(missing) or "section as a JSON object"} section); pass the config.json '
      'of a workdir, or a Python config file'
    )
  return complete(saved)


def read_workdir_config(workdir: str, instead: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json (`read_run_config`); `instead` says what to pass when it is missing."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist (training writes it); {instead}')
  return read_run_config(path)
