"""What a committed checkpoint step holds, checked without Orbax.

compatibility_fingerprint   the settings that fix the state's shapes, kept in
               every step's meta item and compared on restore

MANIFEST       once a step is committed, `cal_jax_files.json` in it lists every
               file with its size and CRC-32 (`step_files`)
damage         what is wrong with a step folder, naming the file, or None
is_disk_full   whether an error (or its cause) is an ENOSPC
"""

import errno
import json
import os
import shutil
import time
import zlib
from typing import Any

import jax
import numpy as np

from cal_jax import workdir as workdir_lib

FINGERPRINT_FIELDS = (
  'depth',
  'width',
  'last_stride',
  'modality_specific_stem',
  'num_parts',
  'pool_sizes',
  'shared_region_mining',
  'adapter_hidden',
  'adapter_dim',
  'channel_reduction',
)
_MISSING = '<missing>'
MANIFEST = 'cal_jax_files.json'
TMP_MARKER = '.orbax-checkpoint-tmp'
METRICS_ITEM = 'metrics'  # orbax's own item name (checkpoint_manager.METRIC_ITEM_NAME)
# What every committed step holds (the meta and state items, as `save` writes them).
REQUIRED_FILES = ('meta/metadata', 'state/_METADATA', 'state/manifest.ocdbt')


def crc32(path: str) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def step_files(step_dir: str) -> dict[str, list[int]]:
  """{path relative to the step: [size, crc32]}, without the manifest and metrics."""
  files = {}
  for folder, dirs, names in os.walk(step_dir):
    rel = os.path.relpath(folder, step_dir)
    if rel == METRICS_ITEM:
      dirs[:] = []
      continue
    for name in names:
      relpath = os.path.normpath(os.path.join(rel, name))
      if relpath != MANIFEST:
        path = os.path.join(folder, name)
        files[relpath] = [os.path.getsize(path), crc32(path)]
  return files


def is_disk_full(error: BaseException) -> bool:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
      'No space left on device' in str(error)
    ):
      return True
    error = error.__cause__ or error.__context__
  return False


def mount_point(path: str) -> str:
  path = os.path.realpath(path)
  while not os.path.ismount(path):
    path = os.path.dirname(path)
  return path


def damage(step_dir: str) -> str | None:
  """What is wrong with the committed `step`, naming the file; None if nothing is seen.

  Checks that the files every step holds are there, that the meta item is
  JSON, and, when the step has its manifest, each file's size and CRC-32.
  A step without a manifest (its writer was killed right after the commit)
  is checked by reading it (`restore`).
  """
  for relpath in REQUIRED_FILES:
    if not os.path.isfile(os.path.join(step_dir, relpath)):
      return f'{os.path.join(step_dir, relpath)} is missing'
  meta = os.path.join(step_dir, REQUIRED_FILES[0])
  try:
    with open(meta, encoding='utf-8') as f:
      json.load(f)
  except (OSError, ValueError) as error:
    return f'{meta} cannot be read ({error})'
  manifest = os.path.join(step_dir, MANIFEST)
  if not os.path.isfile(manifest):
    return None
  try:
    with open(manifest, encoding='utf-8') as f:
      expected = json.load(f)
  except (OSError, ValueError) as error:
    return f'{manifest} cannot be read ({error})'
  for relpath, (size, crc) in sorted(expected.items()):
    path = os.path.join(step_dir, relpath)
    if not os.path.isfile(path):
      return f'{path} is missing'
    actual = os.path.getsize(path)
    if actual != size:
      return f'{path} has {actual} of its {size} bytes'
    if crc32(path) != crc:
      return f'{path} does not hold what was written (checksum differs)'
  return None


def partial_files(directory: str) -> set[tuple[str, str, int, int]]:
  """(folder, file, size, mtime) of every file in the unfinished saves of `directory`."""
  out = set()
  for name in os.listdir(directory):
    if TMP_MARKER in name:
      for folder, _, files in os.walk(os.path.join(directory, name)):
        for file in files:
          try:
            stat = os.stat(os.path.join(folder, file))
          except FileNotFoundError:
            continue
          out.add((folder, file, stat.st_size, stat.st_mtime_ns))
  return out


def to_json(tree: Any) -> Any:
  """`tree` with numpy scalars and arrays made plain Python (tuples become lists)."""
  if isinstance(tree, dict):
    return {str(k): to_json(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [to_json(v) for v in tree]
  if isinstance(tree, (np.ndarray, jax.Array)):
    return np.asarray(tree).tolist()
  if isinstance(tree, np.generic):
    return tree.item()
  return tree


def compatibility_fingerprint(config: Any, num_classes: int) -> dict[str, Any]:
  """The settings that fix the shapes of the train state, as plain JSON values.

  Two configs with equal fingerprints can restore each other's checkpoints;
  the remaining settings (losses, learning rate, augmentation) may differ.
  """
  fingerprint = {name: to_json(config.model[name]) for name in FINGERPRINT_FIELDS}
  fingerprint['num_classes'] = int(num_classes)
  return fingerprint


def fingerprint_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  """One line `name: checkpoint=X, config=Y` per differing field, sorted by name."""
  lines = []
  for name in sorted(set(saved) | set(wanted)):
    have, want = saved.get(name, _MISSING), wanted.get(name, _MISSING)
    if have != want:
      lines.append(f'{name}: checkpoint={have!r}, config={want!r}')
  return lines


def remove_partial_steps(directory: str) -> list[str]:
  """Removes the `*.orbax-checkpoint-tmp*` folders of saves that did not commit."""
  removed = []
  if os.path.isdir(directory):
    for name in sorted(os.listdir(directory)):
      if TMP_MARKER in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        removed.append(name)
  return removed


def disk_full_error(directory: str, step: int, intact: list[int]) -> workdir_lib.WorkdirError:
  """The one error of a save that found the disk full, naming the disk and what is intact."""
  free = workdir_lib.free_bytes(directory)
  return workdir_lib.WorkdirError(
    errno.ENOSPC,
    f'No space left on device: the disk mounted at {mount_point(directory)!r} '
    f'(holding {directory}) has {free / 2**20:.1f} MiB free; the checkpoint of '
    f'step {step} could not be written and its partial copy was removed. '
    + (
      f'The checkpoints of steps {intact} are intact: free some space and run the '
      'same command again to resume.'
      if intact
      else 'No checkpoint was written yet: free some space and start again.'
    ),
  )


def wait_until_unchanged(directory: str, quiet_s: float, limit_s: float) -> None:
  """Waits until the unfinished saves of `directory` have not changed for `quiet_s`
  (at most `limit_s`)."""
  start = last_change = time.monotonic()
  seen = partial_files(directory)
  while time.monotonic() - last_change < quiet_s and time.monotonic() - start < limit_s:
    time.sleep(0.1)
    now = partial_files(directory)
    if now != seen:
      seen, last_change = now, time.monotonic()
