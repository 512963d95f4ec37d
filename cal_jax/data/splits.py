"""From `config.data` to in-memory training and test splits: `load_splits`.

Real data sets are read by their tfds builders from the folder the user names
(`config.data.manual_dir`) and prepared once into the tfds `data_dir`.
With `config.data.synthetic` set ('sysu' | 'regdb' | 'llcm'), a synthetic data
set in that layout is generated first (once, into `manual_dir` or
`WORKDIR/synthetic_data`) and prepared into `WORKDIR/tfds`, never into the
default tfds folder where it could shadow the real data set of the same name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import tempfile
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from cal_jax.data.datasets import (
  llcm,  # noqa: F401  (registers the builder)
  records,
  regdb,  # noqa: F401  (registers the builder)
  specs,
  synthetic,
  sysu_mm01,  # noqa: F401  (registers the builder)
)
from cal_jax.runtime import terminal


@dataclasses.dataclass(frozen=True)
class SplitArrays:
  """One split in memory, example i in row i of every column.

  Attributes:
    image: [N] object array of encoded image bytes (JPEG, PNG, BMP, ...).
    id: [N] int32 data-set identity numbers, not re-mapped.
    camera: [N] int32 cameras (-1 when the source has none).
    modality: [N] int32, 0 visible, 1 infrared.
    path: [N] object array of relative paths ('' when the source has none).
  """

  image: np.ndarray
  id: np.ndarray
  camera: np.ndarray
  modality: np.ndarray
  path: np.ndarray

  def __len__(self) -> int:
    return len(self.id)


@dataclasses.dataclass(frozen=True)
class Splits:
  name: str  # builder name: sysu_mm01 | regdb | llcm
  train: SplitArrays
  test: SplitArrays


def resolve_paths(data: ml_collections.ConfigDict, workdir: str) -> tuple[str, str, str]:
  """(builder name, manual_dir, data_dir) for `config.data` and a workdir."""
  if data.synthetic:
    if data.synthetic not in specs.BY_SHORT:
      raise ValueError(
        f'config.data.synthetic={data.synthetic!r}: choose one of '
        f'{sorted(specs.BY_SHORT)} or "" for real data'
      )
    name = specs.BY_SHORT[data.synthetic].builder
    manual_dir = data.manual_dir or os.path.join(workdir, 'synthetic_data')
    data_dir = data.data_dir or os.path.join(workdir, 'tfds')
    return name, manual_dir, data_dir
  if not data.manual_dir:
    raise ValueError(
      f'config.data.manual_dir is empty: set it to the folder of {data.name} '
      'as its owners distribute it (--config.data.manual_dir=/path/to/it), or '
      'use configs/synthetic.py for the built-in synthetic data'
    )
  if not os.path.isdir(data.manual_dir):
    # tfds would reuse a data set prepared earlier in data_dir without looking at it.
    raise FileNotFoundError(
      f'config.data.manual_dir={data.manual_dir!r} does not exist: point '
      f'it at the folder of {data.name}; data prepared from it earlier is '
      'not used without it'
    )
  return data.name, data.manual_dir, data.data_dir


def data_source_root(name: str, manual_dir: str) -> str:
  """The data set folder the builder `name` reads under (or at) `manual_dir`."""
  return records.find_root(specs.SPECS[name].short, manual_dir)


def ensure_synthetic(
  layout: str,
  root: str,
  num_ids: int,
  seed: int,
  height: int,
  infrared_gap: float = 1.0,
  num_test_ids: int = 0,
  misalignment: bool = False,
) -> None:
  """Generates the synthetic set into `root` unless it is there; atomic (temp dir + rename)."""
  if os.path.isdir(root) and os.listdir(root):
    return
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.synthetic-', dir=parent)
  try:
    summary = synthetic.generate(
      layout,
      os.path.join(staging, 'tree'),
      num_ids,
      seed,
      height=height,
      infrared_gap=infrared_gap,
      num_test_ids=num_test_ids,
      misalignment=misalignment,
    )
    if os.path.isdir(root):
      os.rmdir(root)
    os.replace(os.path.join(staging, 'tree'), root)
    logging.info(
      'Generated a synthetic %s data set: %d images in %s', layout, summary.num_images, root
    )
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def synthetic_seed(config: ml_collections.ConfigDict) -> int:
  """The seed that draws the synthetic identities: data.synthetic_seed, or config.seed if -1.

  A fixed data seed makes a grid over config.seed vary what a real benchmark varies
  (initialisation, batches, augmentation) over one fixed data set.
  """
  fixed = int(config.data.synthetic_seed)
  return int(config.seed) if fixed < 0 else fixed


def check_writable(folder: str, field: str) -> None:
  """Raises WorkdirError naming `field`, the config field that chose `folder`, unless
  a file can be created in `folder` (created if missing)."""
  from cal_jax.runtime import workdir as workdir_lib

  try:
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.write-probe-', dir=folder)
    os.close(fd)
    os.unlink(probe)
  except OSError as error:
    raise workdir_lib.WorkdirError(
      error.errno,
      f'cannot write in {folder!r}, the folder {field} chose to prepare the data set in: '
      f'{error.strerror or error}. Set {field.split("=")[0]} to a writable folder',
    ) from error


def load_splits(config: ml_collections.ConfigDict, workdir: str) -> Splits:
  """Generates (if synthetic), prepares (once) and reads the train and test splits."""
  data = config.data
  name, manual_dir, data_dir = resolve_paths(data, workdir)
  if data.synthetic:
    ensure_synthetic(
      data.synthetic,
      manual_dir,
      data.synthetic_num_ids,
      synthetic_seed(config),
      data.synthetic_height,
      data.synthetic_infrared_gap,
      data.synthetic_test_ids,
      data.synthetic_misalignment,
    )
  full_name = f'{name}/{data.builder_config}' if data.builder_config else name
  builder = tfds.builder(
    full_name, data_dir=data_dir or None, skip_corrupt_images=data.skip_corrupt_images
  )
  prepared = builder.is_prepared()
  if not prepared:
    check_writable(
      data_dir,
      'config.data.data_dir' if data.data_dir else 'config.data.data_dir="" (WORKDIR/tfds)',
    )
    logging.info('Preparing %s from %s into %s.', full_name, manual_dir, builder.data_dir)
  # tfds prints "Downloading and preparing dataset Unknown size" to stdout, though
  # nothing is downloaded: to the log, not the terminal.
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  for line in printed.getvalue().splitlines():
    if line.strip():
      logging.info('tfds: %s', line.strip())
  source = (builder.info.metadata or {}).get('prepared_from', 'a folder not recorded')
  if prepared:
    logging.info(
      'Using %s prepared earlier in %s from %s (config.data.manual_dir=%s).',
      full_name,
      builder.data_dir,
      source,
      manual_dir,
    )
    if os.path.realpath(source) != os.path.realpath(data_source_root(name, manual_dir)):
      logging.warning(
        '%s in %s was prepared from %s, not from config.data.manual_dir=%s: the '
        'prepared copy is used. Delete %s to prepare it again from %s.',
        full_name,
        builder.data_dir,
        source,
        manual_dir,
        builder.data_dir,
        manual_dir,
      )
  skipped = (builder.info.metadata or {}).get('skipped_images', [])
  if skipped:
    logging.warning(
      '%d unreadable images were left out when %s was prepared '
      '(config.data.skip_corrupt_images): %s',
      len(skipped),
      full_name,
      ', '.join(skipped),
    )
  splits = Splits(
    name=name, train=load_builder_split(builder, 'train'), test=load_builder_split(builder, 'test')
  )
  terminal.say(
    'Data: %s from %s (%s in %s): %d training images of %d identities, %d test images of %d.',
    full_name + (' (synthetic)' if data.synthetic else ''),
    manual_dir,
    'prepared earlier' if prepared else 'prepared now',
    builder.data_dir,
    len(splits.train.id),
    len(np.unique(splits.train.id)),
    len(splits.test.id),
    len(np.unique(splits.test.id)),
  )
  return splits


def load_split(dataset: tf.data.Dataset, batch_size: int = 1024) -> SplitArrays:
  """Reads a split into memory, keeping the images encoded.

  Args:
    dataset: examples with 'image' (encoded bytes, e.g. a tfds Image feature
      read with ``tfds.decode.SkipDecoding()``), 'id', 'modality' and
      optionally 'camera' and 'path', in a deterministic order.
    batch_size: examples read at a time.

  Returns:
    The split's columns.
  """
  columns: dict[str, list[np.ndarray]] = {}
  for batch in dataset.batch(batch_size).as_numpy_iterator():
    for key, value in batch.items():
      columns.setdefault(key, []).append(value)
  if not columns:
    raise ValueError('the split is empty')
  full = {key: np.concatenate(values) for key, values in columns.items()}
  n = len(full['id'])
  paths = full.get('path', np.full(n, b'', object))
  return SplitArrays(
    image=full['image'].astype(object),
    id=full['id'].astype(np.int32),
    camera=full.get('camera', np.full(n, -1)).astype(np.int32),
    modality=full['modality'].astype(np.int32),
    path=np.array([p.decode() if isinstance(p, bytes) else str(p) for p in paths], dtype=object),
  )


def load_builder_split(builder: Any, split: str) -> SplitArrays:
  """Reads a split of a prepared tfds builder, images left encoded."""
  dataset = builder.as_dataset(
    split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()}
  )
  return load_split(dataset)
