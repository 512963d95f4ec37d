"""VI-ReID data sets: tfds builders, folder listings and a synthetic generator.

Importing the modules `sysu_mm01`, `regdb` and `llcm` (as `cal_jax.data.splits`
does) registers the tfds builders `sysu_mm01`, `regdb` (configs `trial_1` ..
`trial_10`) and `llcm`, which read each data set from its folder exactly as its
owners distribute it (`manual_dir`); nothing is downloaded. The package itself
imports no TensorFlow: `specs` (which the model reads) and `records.list_records`
(which lists the same folders) work without it, and `synthetic.generate` writes
small fake data sets in the same layouts. `cal_jax.data.datasets.llcm` and the
other builder modules are still reachable as attributes; they load on first use.
"""

import importlib

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

_BUILDER_MODULES = ('llcm', 'regdb', 'sysu_mm01')  # import tensorflow_datasets: on first use


def __getattr__(name: str):
  if name in _BUILDER_MODULES:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
