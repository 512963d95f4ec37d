"""What a committed checkpoint step holds, checked without Orbax.

compatibility_fingerprint   the settings that fix the state's shapes, kept in
               every step's meta item and compared on restore

MANIFEST       once a step is committed, `cal_jax_files.json` in it lists every
               file with its size and CRC-32 (`step_files`), the metrics included
meta_digest, state_digest   CRC-32s of the meta item's values and of the
               state's arrays, saved in the meta item, so in the same commit as
               the state: a step without its manifest (its writer killed right
               after the commit) is checked by them
damage         what is wrong with a step folder, naming the file, or None
metrics_problem  what is wrong with a step's metrics file (orbax reads it first)
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
from absl import logging

from cal_jax.runtime import workdir as workdir_lib

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
  """{path relative to the step: [size, crc32]} of every file but the manifest."""
  files = {}
  for folder, _, names in os.walk(step_dir):
    rel = os.path.relpath(folder, step_dir)
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


def meta_digest(meta: dict[str, Any]) -> int:
  """CRC-32 of the meta item's fingerprint and extra, as sorted JSON."""
  saved = {'fingerprint': meta.get('fingerprint'), 'extra': meta.get('extra')}
  return zlib.crc32(json.dumps(to_json(saved), sort_keys=True).encode())


def state_digest(state: Any) -> int:
  """CRC-32 of the shapes, dtypes and bytes of every array of `state`, in tree order."""
  crc = 0
  for leaf in jax.tree_util.tree_leaves(state):
    array = np.ascontiguousarray(np.asarray(leaf))
    crc = zlib.crc32(f'{array.dtype.str}{array.shape}'.encode(), crc)
    crc = zlib.crc32(memoryview(array).cast('B'), crc)
  return crc


def has_manifest(step_dir: str) -> bool:
  return os.path.isfile(os.path.join(step_dir, MANIFEST))


def metrics_problem(step_dir: str) -> str | None:
  """What is wrong with the step's metrics file (absent is fine), naming it; or None."""
  path = os.path.join(step_dir, METRICS_ITEM, METRICS_ITEM)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      metrics = json.load(f)
  except (OSError, ValueError) as error:
    return f'{path} cannot be read ({error})'
  if not isinstance(metrics, dict):
    return f'{path} holds a JSON {type(metrics).__name__}, not the metrics of the step'
  return None


def set_aside_damaged_metrics(directory: str) -> list[int]:
  """Moves each committed step of `directory` whose metrics file is damaged to
  `<directory>.damaged/` (orbax reads every step's metrics when it starts, and
  fails on one that is not JSON), naming it in a warning. Returns those steps."""
  moved = []
  if not os.path.isdir(directory):
    return moved
  for name in sorted(os.listdir(directory)):
    step_dir = os.path.join(directory, name)
    if not name.isdigit() or not os.path.isdir(step_dir):
      continue
    problem = metrics_problem(step_dir)
    if problem is None:
      continue
    target_root = directory.rstrip(os.sep) + '.damaged'
    target = os.path.join(target_root, name)
    os.makedirs(target_root, exist_ok=True)
    if os.path.exists(target):
      target += time.strftime('-%Y%m%d-%H%M%S')
    os.replace(step_dir, target)
    logging.warning(
      'The checkpoint of step %s in %s is damaged: %s; moved to %s, the newest intact '
      'step is used.',
      name,
      directory,
      problem,
      target,
    )
    moved.append(int(name))
  return moved


def damage(step_dir: str) -> str | None:
  """What is wrong with the committed `step`, naming the file; None if nothing is seen.

  Checks that the files every step holds are there, that the meta item and the
  metrics are JSON, and, when the step has its manifest, that it lists every
  file of the step and each file's size and CRC-32. A step without a manifest
  (its writer was killed right after the commit) is checked by reading it
  (`meta_digest` here, `state_digest` in `CheckpointReader.restore`).
  """
  for relpath in REQUIRED_FILES:
    if not os.path.isfile(os.path.join(step_dir, relpath)):
      return f'{os.path.join(step_dir, relpath)} is missing'
  meta = os.path.join(step_dir, REQUIRED_FILES[0])
  try:
    with open(meta, encoding='utf-8') as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError(f'a JSON {type(saved).__name__}, not an object')
  except (OSError, ValueError) as error:
    return f'{meta} cannot be read ({error})'
  problem = metrics_problem(step_dir)
  if problem:
    return problem
  manifest = os.path.join(step_dir, MANIFEST)
  if not has_manifest(step_dir):
    if not {'meta_digest', 'state_digest'} <= set(saved):
      return f'{manifest} is missing and the step holds no digest, so it cannot be checked'
    if meta_digest(saved) != saved['meta_digest']:
      return f'{meta} does not hold what was written (its digest differs; {MANIFEST} is missing)'
    return None  # the state is checked by its digest as it is read (`restore`)
  try:
    with open(manifest, encoding='utf-8') as f:
      expected = json.load(f)
    entries = sorted(expected.items())
    for _, (size, crc) in entries:
      int(size), int(crc)
  except (OSError, ValueError, TypeError, AttributeError) as error:
    return f'{manifest} cannot be read ({error})'
  for relpath, (size, crc) in entries:
    path = os.path.join(step_dir, relpath)
    if not os.path.isfile(path):
      return f'{path} is missing'
    actual = os.path.getsize(path)
    if actual != size:
      return f'{path} has {actual} of its {size} bytes'
    if crc32(path) != crc:
      return f'{path} does not hold what was written (checksum differs)'
  for folder, _, names in os.walk(step_dir):
    for name in names:
      relpath = os.path.normpath(os.path.relpath(os.path.join(folder, name), step_dir))
      if relpath != MANIFEST and relpath not in expected:
        return f'{os.path.join(step_dir, relpath)} is not in {MANIFEST}, so cannot be checked'
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
