"""VI-ReID data sets: tfds builders, folder listings and a synthetic generator.

Importing this package registers the tfds builders `sysu_mm01`, `regdb`
(configs `trial_1` .. `trial_10`) and `llcm`, which read each data set from
its folder exactly as its owners distribute it (`manual_dir`); nothing is
downloaded. `records.list_records` lists the same folders without TensorFlow,
and `synthetic.generate` writes small fake data sets in the same layouts.
"""

from cal_jax.data.datasets import (
  llcm,  # registers 'llcm'
  regdb,  # registers 'regdb'
  sysu_mm01,  # registers 'sysu_mm01'
)
from cal_jax.data.datasets.folders import DatasetLayoutError
from cal_jax.data.datasets.records import Record, list_records
from cal_jax.data.images import CorruptImageError

__all__ = [
  'CorruptImageError',
  'DatasetLayoutError',
  'Record',
  'list_records',
  'llcm',
  'regdb',
  'sysu_mm01',
]
