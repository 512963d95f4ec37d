"""Lists a VI-ReID data set folder, as its owners distribute it, into records.

Plain Python (no TensorFlow): the tfds builders and the evaluation code both
build on `list_records`, so the examples a builder writes and the query and
gallery sets an evaluator draws come from the same listing.

  list_records(layout, root, split, trial=None) -> list[Record]

`layout` is 'sysu', 'regdb' or 'llcm'; `root` the folder that holds the layout
below; `split` 'train' or 'test'; `trial` 1..10, for RegDB only. A `Record` is
(path, id, camera, modality): `path` is relative to `root` with '/' separators,
`id` the data set's own identity number (never re-mapped), `camera` its own
camera number, `modality` 0 visible, 1 infrared (near-infrared or thermal).

Layouts (docs/data.md has the full description and where each fact comes from):

  SYSU-MM01  cam1/ .. cam6/ (<id:04d>/<n:04d>.jpg), exp/train_id.txt,
             exp/val_id.txt, exp/test_id.txt (one line of comma-separated ids;
             ids separated by line breaks are read too).
             train = train_id + val_id, test = test_id, every camera; camera N
             of camN; cam3 and cam6 are infrared.
  RegDB      Visible/<id>/*.bmp, Thermal/<id>/*.bmp, and per trial t
             idx/{train,test}_{visible,thermal}_<t>.txt of `relative/path label`
             lines. id = the identity folder (the label column is the trial's
             re-mapped label and is not used); camera 1 visible, 2 thermal.
  LLCM       vis/<id:04d>/, nir/<id:04d>/ (<id:04d>_c<cam:02d>_s.._f.._{vis,nir}
             .jpg), test copies in test_vis/cam1..cam9/<id:04d>/ and
             test_nir/cam{1,2,4..9}/<id:04d>/, idx/train_vis.txt,
             idx/train_nir.txt (`path label` lines), idx/test_id.txt (one line).
             train = the two train idx files, camera from `_c<cam>` of the file
             name; test = the files under test_vis/ and test_nir/ of the ids in
             idx/test_id.txt (the folders DEEN's test code reads), camera from
             the camK folder.

Records are sorted by (id, camera, path): the order in which the reference code
(`process_query_sysu`, `process_gallery_sysu`, `process_*_llcm` of
mangye16/Cross-Modal-Re-ID-baseline and ZYK100/LLCM) visits files, identities
sorted, then cameras, then file names. Seeding Python's `random` and calling
`random.choice` per (id, camera) group in that order reproduces its galleries.

A missing, empty or partly copied folder raises `DatasetLayoutError` (a
ValueError) that lists what was expected, what was found and what to do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

from cal_jax.data.datasets import specs
from cal_jax.data.datasets.folders import (
  DISTRIBUTED_NAMES,
  DatasetLayoutError,
  check_disjoint,
  entries,
  identity_folder,
  identity_folders,
  images_in,
  read_id_line,
  read_index,
  require,
  shorten,
)
from cal_jax.data.datasets.specs import REGDB_TRIALS
from cal_jax.data.modality import INFRARED, VISIBLE

SYSU_ID_FILES = ('exp/train_id.txt', 'exp/val_id.txt', 'exp/test_id.txt')

_MARKERS = {'sysu': ('cam1', 'exp'), 'regdb': ('Visible', 'idx'), 'llcm': ('test_vis', 'idx')}
_LLCM_NAME = re.compile(r'^(\d+)_c(\d+)_')
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, order=True)
class Record:
  """One image of a data set, as listed from its folder (no pixels)."""

  path: str  # relative to the data set root, '/' separators
  id: int  # the data set's own identity number
  camera: int  # the data set's own camera number
  modality: int  # 0 visible, 1 infrared / near-infrared / thermal


def _walk_identities(
  layout: str,
  root: str,
  camera_dirs: dict[str, tuple],
  ids: list[int],
  split_file: str,
  listed: set[int] | None = None,
) -> list[Record]:
  """Records of `ids` under camera folders {rel_dir: (camera, modality)}.

  `listed`: every id of every split file; a camera's identity folder of an id
  in none of them is logged (its images belong to no split).
  """
  records, empty, unlisted = [], [], []
  wanted = set(ids)
  for rel_dir, (camera, modality) in camera_dirs.items():
    folders = identity_folders(layout, root, rel_dir)
    if listed is not None:
      unlisted += [f'{rel_dir}/{folders[p]}/' for p in sorted(set(folders) - listed)]
    for pid in sorted(wanted & set(folders)):  # not every identity passes every camera
      rel = f'{rel_dir}/{folders[pid]}'
      names = images_in(os.path.join(root, rel))
      if not names:
        empty.append(rel + '/')
      records += [Record(f'{rel}/{n}', pid, camera, modality) for n in names]
  if empty:
    raise DatasetLayoutError(
      layout,
      root,
      'identity folders without images (a partial copy?)',
      ['images in every identity folder'],
      ['empty: ' + e for e in empty],
    )
  unseen = sorted(set(ids) - {r.id for r in records})
  if unseen:
    raise DatasetLayoutError(
      layout,
      root,
      f'{len(unseen)} identities of {split_file} have no '
      'image in any camera folder (a partial copy?)',
      [f'<camera>/{pid:04d}/ for every id of {split_file}' for pid in ids],
      [f'no folder for id {pid}' for pid in unseen],
    )
  if unlisted:
    _LOG.warning(
      '%s folder %s: %d identity folders of ids in no split file are not used: %s',
      DISTRIBUTED_NAMES.get(layout, layout),
      root,
      len(unlisted),
      shorten(unlisted),
    )
  return records


def _sorted(records: list[Record]) -> list[Record]:
  return sorted(records, key=lambda r: (r.id, r.camera, r.path))


def sysu_records(root: str, split: str) -> list[Record]:
  """SYSU-MM01 (Wu et al., ICCV 2017) images of `split`, see module doc."""
  cams = [f'cam{c}' for c in range(1, 7)]
  require('sysu', root, cams, SYSU_ID_FILES)
  empty = [c + '/' for c in cams if not entries(os.path.join(root, c))]
  if empty:
    raise DatasetLayoutError(
      'sysu',
      root,
      'empty camera folders (a partial copy?)',
      ['identity folders in cam1/ .. cam6/'],
      ['empty: ' + e for e in empty],
    )
  lists = {f: set(read_id_line('sysu', root, f)) for f in SYSU_ID_FILES}
  check_disjoint(
    'sysu', root, {f: lists[f] for f in SYSU_ID_FILES[:2]}, {f: lists[f] for f in SYSU_ID_FILES[2:]}
  )
  id_files = SYSU_ID_FILES[:2] if split == 'train' else SYSU_ID_FILES[2:]
  ids = sorted(set().union(*(lists[f] for f in id_files)))
  cameras = specs.BY_SHORT['sysu'].cameras
  camera_dirs = {
    f'cam{c}': (c, INFRARED if c in cameras[INFRARED] else VISIBLE) for c in range(1, 7)
  }
  return _sorted(
    _walk_identities(
      'sysu', root, camera_dirs, ids, ' + '.join(id_files), listed=set().union(*lists.values())
    )
  )


def regdb_records(root: str, split: str, trial: int) -> list[Record]:
  """RegDB (Nguyen et al., Sensors 2017) images of `split` in `trial` 1..10."""
  if trial not in REGDB_TRIALS:
    raise ValueError(f'RegDB trial must be one of 1..10, got {trial!r}')
  (visible,), (thermal,) = (specs.BY_SHORT['regdb'].cameras[m] for m in (VISIBLE, INFRARED))
  files = {
    s: {
      f'idx/{s}_visible_{trial}.txt': (visible, VISIBLE),
      f'idx/{s}_thermal_{trial}.txt': (thermal, INFRARED),
    }
    for s in SPLITS
  }
  require('regdb', root, ['Visible', 'Thermal', 'idx'], [*files['train'], *files['test']])
  listing = {
    s: {
      rel: [
        (path, identity_folder('regdb', root, path, 1)) for path in read_index('regdb', root, rel)
      ]
      for rel in files[s]
    }
    for s in SPLITS
  }
  check_disjoint(
    'regdb',
    root,
    *({rel: {pid for _, pid in rows} for rel, rows in listing[s].items()} for s in SPLITS),
  )
  return _sorted(
    [
      Record(path, pid, *files[split][rel])
      for rel, rows in listing[split].items()
      for path, pid in rows
    ]
  )


def llcm_records(root: str, split: str) -> list[Record]:
  """LLCM (Zhang and Wang, CVPR 2023) images of `split`, see module doc."""
  cameras = specs.BY_SHORT['llcm'].cameras
  vis = {f'test_vis/cam{c}': (c, VISIBLE) for c in cameras[VISIBLE]}
  nir = {f'test_nir/cam{c}': (c, INFRARED) for c in cameras[INFRARED]}
  train_files = {'idx/train_vis.txt': VISIBLE, 'idx/train_nir.txt': INFRARED}
  require('llcm', root, ['idx', *vis, *nir], [*train_files, 'idx/test_id.txt'])
  records = []
  for rel, modality in train_files.items():
    for path in read_index('llcm', root, rel):
      match = _LLCM_NAME.match(path.rsplit('/', 1)[-1])
      if not match:
        raise DatasetLayoutError(
          'llcm',
          root,
          f'{rel} lists a file not named as LLCM names them',
          ['file names <id>_c<camera>_s<seq>_f<frame>_{vis,nir}.jpg'],
          [path],
        )
      records.append(Record(path, int(match[1]), int(match[2]), modality))
  test_ids = set(read_id_line('llcm', root, 'idx/test_id.txt'))
  check_disjoint(
    'llcm',
    root,
    {
      rel: {r.id for r in records if r.modality == modality}
      for rel, modality in train_files.items()
    },
    {'idx/test_id.txt': test_ids},
  )
  if split == 'test':
    return _sorted(
      _walk_identities(
        'llcm',
        root,
        {**vis, **nir},
        sorted(test_ids),
        'idx/test_id.txt',
        listed=test_ids | {r.id for r in records},
      )
    )
  return _sorted(records)


LAYOUTS = tuple(specs.BY_SHORT)
SPLITS = ('train', 'test')


def list_records(layout: str, root: str, split: str, trial: int | None = None) -> list[Record]:
  """Records of `split` ('train' | 'test') of the `layout` folder at `root`.

  Args:
    layout: 'sysu', 'regdb' or 'llcm'.
    root: the data set folder (the one holding cam1/, Visible/ or test_vis/).
    split: 'train' or 'test'.
    trial: RegDB trial 1..10 (the idx files to read); must be None otherwise.

  Returns:
    Records sorted by (id, camera, path).

  Raises:
    DatasetLayoutError: the folder is missing, empty or partly copied.
  """
  root = os.fspath(root)
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  if layout == 'regdb':
    if trial is None:
      raise ValueError('RegDB needs a trial (1..10)')
    return regdb_records(root, split, trial)
  if trial is not None:
    raise ValueError(f'{layout} has no trials; got trial={trial!r}')
  if layout == 'sysu':
    return sysu_records(root, split)
  if layout == 'llcm':
    return llcm_records(root, split)
  raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')


def find_root(layout: str, path: str) -> str:
  """`path` if it holds the `layout` data set, else its distributed subfolder.

  Lets tfds' default manual directory (one folder for every data set) hold
  SYSU-MM01/, RegDB/ and LLCM/ side by side. Returns `path` unchanged when
  neither matches, so that `list_records` reports what it found there.
  """
  path = os.fspath(path)
  markers = _MARKERS[layout]
  for candidate in (path, os.path.join(path, DISTRIBUTED_NAMES[layout])):
    if all(os.path.exists(os.path.join(candidate, m)) for m in markers):
      return candidate
  return path
