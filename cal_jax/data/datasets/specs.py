"""What the code knows of each data set, in one table: `SPECS`.

  builder            the tfds builder (`config.data.name`): sysu_mm01, regdb, llcm
  short              the folder layout (`records.list_records`, `config.data.synthetic`)
                     and the prefix of the protocol keys: sysu, regdb, llcm
  distributed_name   the folder under which its owners distribute it
  protocols          {protocol key: its name in the paper's tables}, in table order
  cameras            {modality: camera numbers}; for LLCM the test cameras (its
                     near-infrared test set has no camera 3, as DEEN lists them)
  table_title        the title of its results table
  builder_configs    the builder's configs ('' for none): RegDB's trial_1 .. trial_10

Plain Python: the config checks, the folder listings, the protocols and the
results tables all read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cal_jax.data.modality import INFRARED, VISIBLE

REGDB_TRIALS = tuple(range(1, 11))


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  builder: str
  short: str
  distributed_name: str
  protocols: dict[str, str]
  cameras: dict[int, tuple[int, ...]]
  table_title: str
  builder_configs: tuple[str, ...] = ('',)


SPECS = {
  spec.builder: spec
  for spec in (
    DatasetSpec(
      'sysu_mm01',
      'sysu',
      'SYSU-MM01',
      {
        'sysu/all/single': 'SYSU-MM01 all-search single-shot',
        'sysu/all/multi': 'SYSU-MM01 all-search multi-shot',
        'sysu/indoor/single': 'SYSU-MM01 indoor-search single-shot',
        'sysu/indoor/multi': 'SYSU-MM01 indoor-search multi-shot',
      },
      {VISIBLE: (1, 2, 4, 5), INFRARED: (3, 6)},
      "SYSU-MM01 (as the paper's Table 1)",
    ),
    DatasetSpec(
      'regdb',
      'regdb',
      'RegDB',
      {'regdb/v2t': 'RegDB visible to infrared', 'regdb/t2v': 'RegDB infrared to visible'},
      {VISIBLE: (1,), INFRARED: (2,)},
      "RegDB (as the paper's Table 2)",
      builder_configs=tuple(f'trial_{t}' for t in REGDB_TRIALS),
    ),
    DatasetSpec(
      'llcm',
      'llcm',
      'LLCM',
      {'llcm/v2n': 'LLCM VIS to NIR', 'llcm/n2v': 'LLCM NIR to VIS'},
      {VISIBLE: tuple(range(1, 10)), INFRARED: (1, 2, 4, 5, 6, 7, 8, 9)},
      'LLCM',
    ),
  )
}
BY_SHORT = {spec.short: spec for spec in SPECS.values()}
PROTOCOL_KEYS = tuple(key for spec in SPECS.values() for key in spec.protocols)
MODE_NAMES = {key: name for spec in SPECS.values() for key, name in spec.protocols.items()}


def camera_classes(builder: str) -> list[tuple[int, int]]:
  """The (modality, camera) pairs of a data set, visible first: the classes of MCLNet's
  camera centres (Table 4's ICA&CCA). SYSU-MM01: 6, RegDB: 2, LLCM: 17."""
  spec = spec_of(builder)
  return [(m, c) for m in (VISIBLE, INFRARED) for c in spec.cameras[m]]


def camera_class_index(builder: str, modality: Any, camera: Any) -> np.ndarray:
  """[N] camera class of each example (`camera_classes`); an example whose camera is not
  listed (-1: the source has none) gets its modality's first camera."""
  classes = camera_classes(builder)
  modality, camera = np.asarray(modality), np.asarray(camera)
  out = np.full(modality.shape, -1, np.int32)
  for index, (m, c) in enumerate(classes):
    out[(modality == m) & (camera == c)] = index
  for m in (VISIBLE, INFRARED):
    first = next(i for i, (mm, _) in enumerate(classes) if mm == m)
    out[(out < 0) & (modality == m)] = first
  return out


def spec_of(builder: str) -> DatasetSpec:
  """The spec of a tfds builder name; ValueError naming the known ones."""
  if builder not in SPECS:
    raise ValueError(f'no test protocols for data set {builder!r}; one of {sorted(SPECS)}')
  return SPECS[builder]
