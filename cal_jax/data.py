"""From `config.data` to in-memory training and test splits.

Real data sets are read by their tfds builders from the folder the user names
(`config.data.manual_dir`) and prepared once into the tfds `data_dir`.
With `config.data.synthetic` set ('sysu' | 'regdb' | 'llcm'), a synthetic data
set in that layout is generated first (once, into `manual_dir` or
`WORKDIR/synthetic_data`) and prepared into `WORKDIR/tfds`, never into the
default tfds folder where it could shadow the real data set of the same name.
"""

import dataclasses
import os
import shutil
import tempfile

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

import cal_jax.datasets  # noqa: F401  (registers the builders)
from cal_jax import input_pipeline
from cal_jax.datasets import records, synthetic

SYNTHETIC_LAYOUT_TO_BUILDER = {'sysu': 'sysu_mm01', 'regdb': 'regdb', 'llcm': 'llcm'}


@dataclasses.dataclass(frozen=True)
class Splits:
  name: str  # builder name: sysu_mm01 | regdb | llcm
  train: input_pipeline.SplitArrays
  test: input_pipeline.SplitArrays


def resolve_paths(data: ml_collections.ConfigDict, workdir: str) -> tuple[str, str, str]:
  """(builder name, manual_dir, data_dir) for `config.data` and a workdir."""
  if data.synthetic:
    if data.synthetic not in SYNTHETIC_LAYOUT_TO_BUILDER:
      raise ValueError(f'config.data.synthetic={data.synthetic!r}: choose one of '
                       f'{sorted(SYNTHETIC_LAYOUT_TO_BUILDER)} or "" for real data')
    name = SYNTHETIC_LAYOUT_TO_BUILDER[data.synthetic]
    manual_dir = data.manual_dir or os.path.join(workdir, 'synthetic_data')
    data_dir = data.data_dir or os.path.join(workdir, 'tfds')
    return name, manual_dir, data_dir
  if not data.manual_dir:
    raise ValueError(f'config.data.manual_dir is empty: set it to the folder of {data.name} '
                     'as its owners distribute it (--config.data.manual_dir=/path/to/it), or '
                     'use configs/synthetic.py for the built-in synthetic data')
  if not os.path.isdir(data.manual_dir):
    # tfds would reuse a data set prepared earlier in data_dir without looking at it.
    raise FileNotFoundError(f'config.data.manual_dir={data.manual_dir!r} does not exist: point '
                            f'it at the folder of {data.name}; data prepared from it earlier is '
                            'not used without it')
  return data.name, data.manual_dir, data.data_dir


def data_source_root(name: str, manual_dir: str) -> str:
  """The data set folder the builder `name` reads under (or at) `manual_dir`."""
  layout = {builder: layout for layout, builder in SYNTHETIC_LAYOUT_TO_BUILDER.items()}[name]
  return records.find_root(layout, manual_dir)


def ensure_synthetic(layout: str, root: str, num_ids: int, seed: int, height: int,
                     infrared_gap: float = 1.0) -> None:
  """Generates the synthetic set into `root` unless it is there; atomic (temp dir + rename)."""
  if os.path.isdir(root) and os.listdir(root):
    return
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.synthetic-', dir=parent)
  try:
    summary = synthetic.generate(layout, os.path.join(staging, 'tree'), num_ids, seed,
                                 height=height, infrared_gap=infrared_gap)
    if os.path.isdir(root):
      os.rmdir(root)
    os.replace(os.path.join(staging, 'tree'), root)
    logging.info('Generated a synthetic %s data set: %d images in %s', layout,
                 summary.num_images, root)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def load_splits(config: ml_collections.ConfigDict, workdir: str) -> Splits:
  """Generates (if synthetic), prepares (once) and reads the train and test splits."""
  data = config.data
  name, manual_dir, data_dir = resolve_paths(data, workdir)
  if data.synthetic:
    ensure_synthetic(data.synthetic, manual_dir, data.synthetic_num_ids, config.seed,
                     data.synthetic_height, data.synthetic_infrared_gap)
  full_name = f'{name}/{data.builder_config}' if data.builder_config else name
  builder = tfds.builder(full_name, data_dir=data_dir or None,
                         skip_corrupt_images=data.get('skip_corrupt_images', False))
  prepared = builder.is_prepared()
  if not prepared:
    logging.info('Preparing %s from %s into %s.', full_name, manual_dir, builder.data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  source = (builder.info.metadata or {}).get('prepared_from', 'a folder not recorded')
  if prepared:
    logging.info('Using %s prepared earlier in %s from %s (config.data.manual_dir=%s).',
                 full_name, builder.data_dir, source, manual_dir)
    if os.path.realpath(source) != os.path.realpath(data_source_root(name, manual_dir)):
      logging.warning('%s in %s was prepared from %s, not from config.data.manual_dir=%s: the '
                      'prepared copy is used. Delete %s to prepare it again from %s.', full_name,
                      builder.data_dir, source, manual_dir, builder.data_dir, manual_dir)
  skipped = (builder.info.metadata or {}).get('skipped_images', [])
  if skipped:
    logging.warning('%d unreadable images were left out when %s was prepared '
                    '(config.data.skip_corrupt_images): %s', len(skipped), full_name,
                    ', '.join(skipped))
  return Splits(name=name,
                train=input_pipeline.load_builder_split(builder, 'train'),
                test=input_pipeline.load_builder_split(builder, 'test'))
