"""Query and gallery sets of the VI-ReID test protocols.

Everything here works on the test split's records: objects with the
attributes ``path`` (str), ``id`` (int, the data set's own identity number),
``camera`` (int) and ``modality`` (int, 0 visible, 1 infrared), or a
`RecordTable` of parallel arrays. The functions return indices into that
record list; `build_split` maps a protocol key of the project to a `Split`.

The constructions reproduce the standard code family:

* SYSU-MM01 (AGW ``data_manager.py``: ``process_query_sysu``,
  ``process_gallery_sysu``): queries are every infrared image (cameras 3, 6);
  the gallery draws, per identity (sorted) and per camera (1, 2, 4, 5 for
  all-search; 1, 2 for indoor), from the folder's files in sorted order, one
  image with ``random.choice`` after ``random.seed(trial)`` (single-shot) or
  ten with ``random.sample`` (multi-shot, this project's choice, see the
  decisions document). The data set's ``exp/rand_perm_cam.mat`` (the original
  MATLAB protocol, as MPANet's ``utils/eval_sysu.py`` reads it) can be used
  instead.
* RegDB (AGW ``test.py``): v2t ranks the thermal test images for each visible
  test image; t2v the reverse. No sampling.
* LLCM (DEEN ``data_manager.py``: ``process_query_llcm``,
  ``process_gallery_llcm``): queries are every test image of one modality;
  the gallery is one image per (identity, camera) of the other modality,
  ``random.choice`` after ``random.seed(trial)``.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cal_jax.data.datasets import specs
from cal_jax.data.modality import INFRARED, VISIBLE

PROTOCOL_KEYS = specs.PROTOCOL_KEYS
NUM_TRIALS = 10

_SYSU_CAMERAS = specs.SPECS['sysu_mm01'].cameras
SYSU_QUERY_CAMERAS = _SYSU_CAMERAS[INFRARED]
# Indoor search: the two indoor visible cameras.
SYSU_GALLERY_CAMERAS = {'all': _SYSU_CAMERAS[VISIBLE], 'indoor': (1, 2)}
SYSU_SHOTS = {'single': 1, 'multi': 10}
# Where the SYSU-MM01 distribution keeps its fixed gallery permutations.
RAND_PERM_RELPATH = os.path.join('exp', 'rand_perm_cam.mat')

# DEEN's camera lists: the near-infrared test set has no camera 3.
LLCM_CAMERAS = specs.SPECS['llcm'].cameras


@dataclasses.dataclass(frozen=True)
class RecordTable:
  """Parallel arrays of a record list ([N] each), named as a `Record`'s fields."""

  path: np.ndarray
  id: np.ndarray
  camera: np.ndarray
  modality: np.ndarray

  def __post_init__(self):
    n = len(self.path)
    for name in ('id', 'camera', 'modality'):
      if len(getattr(self, name)) != n:
        raise ValueError(f'RecordTable.{name} has {len(getattr(self, name))} entries, path has {n}')

  def __len__(self) -> int:
    return len(self.path)

  @classmethod
  def from_records(cls, records: Iterable[Any]) -> RecordTable:
    """Builds the table from objects with path, id, camera, modality."""
    records = list(records)
    return cls(
      path=np.array([str(r.path) for r in records], dtype=object),
      id=np.array([int(r.id) for r in records], dtype=np.int64),
      camera=np.array([int(r.camera) for r in records], dtype=np.int64),
      modality=np.array([int(r.modality) for r in records], dtype=np.int64),
    )

  @classmethod
  def of_columns(cls, columns: Any) -> RecordTable:
    """The table of an object with array columns path, id, camera, modality
    (a test split, `cal_jax.data.splits.SplitArrays`)."""
    return cls(
      path=np.asarray(columns.path, dtype=object),
      id=np.asarray(columns.id, np.int64),
      camera=np.asarray(columns.camera, np.int64),
      modality=np.asarray(columns.modality, np.int64),
    )


def as_table(records: RecordTable | Sequence[Any]) -> RecordTable:
  """Returns ``records`` as a `RecordTable` (a no-op for a table)."""
  if isinstance(records, RecordTable):
    return records
  return RecordTable.from_records(records)


@dataclasses.dataclass(frozen=True)
class Split:
  """One evaluation of one protocol.

  Attributes:
    key: the protocol key, one of `PROTOCOL_KEYS`.
    trial: the gallery draw (0..9); RegDB's trial is its data split instead.
    query: [Q] record indices of the probes (rows of the distance matrix).
    gallery: [G] record indices of the ranked set (columns).
    metric: the ``protocol`` argument of `cal_jax.evaluation.metrics.evaluate_ranking`.
    gallery_draw: how the gallery was chosen, to be reported with results.
  """

  key: str
  trial: int
  query: np.ndarray
  gallery: np.ndarray
  metric: str
  gallery_draw: str


def build_split(
  records: RecordTable | Sequence[Any],
  key: str,
  trial: int = 0,
  rand_perm: np.ndarray | None = None,
  llcm_v2n_as_released: bool = False,
) -> Split:
  """Query and gallery of protocol ``key`` for one trial.

  Args:
    records: the test split's records (or their `RecordTable`).
    key: one of `PROTOCOL_KEYS`.
    trial: gallery draw 0..9 for SYSU-MM01 and LLCM; unused for RegDB, whose
      trials are different record lists.
    rand_perm: SYSU-MM01 only: the cell array of `load_rand_perm`; when given
      the gallery follows it instead of ``random.seed(trial)``.
    llcm_v2n_as_released: ``llcm/v2n`` only: reproduce DEEN's released
      ``test.py`` for ``test_mode = [2, 1]``, which evaluates the sampled
      near-infrared images as probes against every visible image (see the
      decisions document); the default uses the visible images as probes.

  Returns:
    The `Split`.
  """
  if key not in PROTOCOL_KEYS:
    raise ValueError(f'unknown protocol key {key!r}; one of {PROTOCOL_KEYS}')
  table = as_table(records)
  dataset, rest = key.split('/', 1)
  if rand_perm is not None and dataset != 'sysu':
    raise ValueError('rand_perm only applies to SYSU-MM01')
  if dataset == 'sysu':
    mode, shot = rest.split('/')
    query = sysu_query(table)
    gallery = sysu_gallery(table, mode, shot, trial, rand_perm)
    draw = f'rand_perm_cam.mat run {trial}' if rand_perm is not None else f'random.seed({trial})'
    return Split(key, trial, query, gallery, 'sysu', draw)
  if dataset == 'regdb':
    query, gallery = regdb_split(table, rest)
    return Split(key, trial, query, gallery, 'regdb', 'whole test split')
  probe_modality = VISIBLE if rest == 'v2n' else INFRARED
  query = llcm_query(table, probe_modality)
  gallery = llcm_gallery(table, 1 - probe_modality, trial)
  draw = f'random.seed({trial})'
  if rest == 'v2n' and llcm_v2n_as_released:
    query, gallery = gallery, query
    draw += ", probes and gallery swapped as DEEN's released test.py"
  return Split(key, trial, query, gallery, 'llcm', draw)


def sysu_query(records: RecordTable | Sequence[Any]) -> np.ndarray:
  """All infrared images of cameras 3 and 6, in AGW's listing order.

  Returns:
    [Q] record indices ordered by identity, camera (3 then 6), file name.
  """
  table = as_table(records)
  return _list_images(table, SYSU_QUERY_CAMERAS, INFRARED)


def sysu_gallery(
  records: RecordTable | Sequence[Any],
  mode: str = 'all',
  shot: str = 'single',
  trial: int = 0,
  rand_perm: np.ndarray | None = None,
) -> np.ndarray:
  """The visible gallery of one SYSU-MM01 trial.

  Args:
    records: the test split's records.
    mode: "all" (cameras 1, 2, 4, 5) or "indoor" (cameras 1, 2).
    shot: "single" (one image per identity and camera) or "multi" (ten, or
      all of a folder holding fewer).
    trial: the draw, 0..9.
    rand_perm: if given, the cell array of `load_rand_perm`; the draw is then
      the first 1 or 10 entries of run ``trial`` of the data set's fixed
      permutation for that camera and identity.

  Returns:
    [G] record indices ordered by identity, camera (in the order above), and
    the order of the draw.
  """
  if mode not in SYSU_GALLERY_CAMERAS:
    raise ValueError(f"mode must be 'all' or 'indoor', got {mode!r}")
  if shot not in SYSU_SHOTS:
    raise ValueError(f"shot must be 'single' or 'multi', got {shot!r}")
  if trial < 0:
    raise ValueError(f'trial must be non-negative, got {trial}')
  table = as_table(records)
  groups = _group_files(table, SYSU_GALLERY_CAMERAS[mode], VISIBLE)
  if rand_perm is not None:
    return _draw_rand_perm(
      table, groups, SYSU_GALLERY_CAMERAS[mode], SYSU_SHOTS[shot], trial, rand_perm
    )
  return _draw_random(groups, SYSU_GALLERY_CAMERAS[mode], SYSU_SHOTS[shot], trial)


def load_rand_perm(path: str) -> np.ndarray:
  """Reads ``rand_perm_cam`` from SYSU-MM01's ``exp/rand_perm_cam.mat``.

  Returns:
    The MATLAB cell array as scipy loads it: entry ``[cam - 1][0]`` holds,
    per identity ``pid - 1``, a [runs, images] array of 1-based image numbers.
  """
  import scipy.io

  return scipy.io.loadmat(path)['rand_perm_cam']


def regdb_split(
  records: RecordTable | Sequence[Any], direction: str
) -> tuple[np.ndarray, np.ndarray]:
  """Probes and gallery of one RegDB trial, in record (index file) order.

  Args:
    records: the trial's test records, both modalities.
    direction: "v2t" (visible probes, thermal gallery) or "t2v".

  Returns:
    ([Q], [G]) record indices.
  """
  if direction not in ('v2t', 't2v'):
    raise ValueError(f"direction must be 'v2t' or 't2v', got {direction!r}")
  table = as_table(records)
  visible = np.flatnonzero(table.modality == VISIBLE)
  thermal = np.flatnonzero(table.modality == INFRARED)
  return (visible, thermal) if direction == 'v2t' else (thermal, visible)


def llcm_query(records: RecordTable | Sequence[Any], modality: int) -> np.ndarray:
  """Every LLCM test image of ``modality`` in DEEN's listing order.

  Returns:
    [Q] record indices ordered by identity, camera, file name.
  """
  table = as_table(records)
  return _list_images(table, LLCM_CAMERAS[modality], modality)


def llcm_gallery(records: RecordTable | Sequence[Any], modality: int, trial: int = 0) -> np.ndarray:
  """One random LLCM test image of ``modality`` per (identity, camera).

  Returns:
    [G] record indices ordered by identity and camera (DEEN's order).
  """
  if trial < 0:
    raise ValueError(f'trial must be non-negative, got {trial}')
  table = as_table(records)
  groups = _group_files(table, LLCM_CAMERAS[modality], modality)
  return _draw_random(groups, LLCM_CAMERAS[modality], 1, trial)


def _group_files(
  table: RecordTable, cameras: Sequence[int], modality: int
) -> dict[tuple[int, int], list[int]]:
  """Record indices per (identity, camera), each list in file-name order.

  The reference lists a folder ``cam/id/`` and sorts the full paths; within
  one folder that is the order of the file names.
  """
  selected = np.flatnonzero(np.isin(table.camera, cameras) & (table.modality == modality))
  groups: dict[tuple[int, int], list[int]] = {}
  for i in selected:
    groups.setdefault((int(table.id[i]), int(table.camera[i])), []).append(int(i))
  for members in groups.values():
    members.sort(key=lambda i: os.path.basename(table.path[i]))
  return groups


def _visit(
  groups: dict[tuple[int, int], list[int]], cameras: Sequence[int]
) -> Iterable[tuple[int, int, list[int]]]:
  """The reference's loop: identities sorted, then cameras in list order."""
  for pid in sorted({pid for pid, _ in groups}):
    for cam in cameras:
      if (pid, cam) in groups:
        yield pid, cam, groups[(pid, cam)]


def _list_images(table: RecordTable, cameras: Sequence[int], modality: int) -> np.ndarray:
  groups = _group_files(table, cameras, modality)
  out = [i for _, _, members in _visit(groups, cameras) for i in members]
  return np.asarray(out, dtype=np.int64)


def _draw_random(
  groups: dict[tuple[int, int], list[int]], cameras: Sequence[int], shots: int, trial: int
) -> np.ndarray:
  # A private generator seeded like the reference's ``random.seed(trial)``
  # yields the same draws without touching the global state.
  rng = random.Random(trial)
  out = []
  for _, _, members in _visit(groups, cameras):
    if shots == 1:
      out.append(rng.choice(members))
    else:
      out.extend(rng.sample(members, min(shots, len(members))))
  return np.asarray(out, dtype=np.int64)


def _draw_rand_perm(
  table: RecordTable,
  groups: dict[tuple[int, int], list[int]],
  cameras: Sequence[int],
  shots: int,
  trial: int,
  rand_perm: np.ndarray,
) -> np.ndarray:
  """MPANet's ``get_gallery_names``: image ``cam/pid/%04d`` per pick."""
  out = []
  for pid, cam, members in _visit(groups, cameras):
    cam_perm = np.asarray(rand_perm[cam - 1][0]).squeeze()
    entry = np.asarray(cam_perm[pid - 1]) if pid - 1 < len(cam_perm) else np.zeros((0, 0))
    if entry.size == 0:
      raise ValueError(
        f'rand_perm_cam has no permutation for identity {pid} '
        f'in camera {cam}, which has {len(members)} images'
      )
    entry = np.atleast_2d(entry)
    if trial >= entry.shape[0]:
      raise ValueError(f'rand_perm_cam has {entry.shape[0]} runs; trial {trial} asked')
    by_name = {os.path.splitext(os.path.basename(table.path[i]))[0]: i for i in members}
    for number in entry[trial][:shots]:
      name = f'{int(number):04d}'
      if name not in by_name:
        raise ValueError(
          f'rand_perm_cam picks image {name} of identity '
          f'{pid} in camera {cam}, absent from the records'
        )
      out.append(by_name[name])
  return np.asarray(out, dtype=np.int64)
