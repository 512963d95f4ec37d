"""What the three VI-ReID tfds builders share: features, info, examples.

Every example of `sysu_mm01`, `regdb` and `llcm` has the same features:
  image     [H, W, 3] uint8 (grayscale and thermal images as 3 equal channels)
  id        int32, the data set's own identity number (not re-mapped)
  camera    int32, the data set's own camera number
  modality  int32, 0 visible, 1 infrared / near-infrared / thermal
  path      text, the image's path relative to the data set root ('/')
Examples keep the order of `records.list_records` (sorted by id, camera, path):
shuffling is disabled, so reading a split in order gives that listing.

An image that cannot be decoded stops the preparation naming the file, unless
the builder is made with `skip_corrupt_images=True` (config.data.
skip_corrupt_images): then each such image is logged and left out, and the
list of skipped paths is kept in the prepared data set's metadata
(`skipped_images`), so that every later run can report it. The folder it was
prepared from is kept there too (`prepared_from`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from cal_jax.data import images
from cal_jax.data.datasets import folders
from cal_jax.data.datasets import records as records_lib


def features() -> tfds.features.FeaturesDict:
  """The feature dictionary every VI-ReID builder shares (module doc)."""
  return tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(None, None, 3)),
      'id': tfds.features.Scalar(dtype=np.int32),
      'camera': tfds.features.Scalar(dtype=np.int32),
      'modality': tfds.features.Scalar(dtype=np.int32),
      'path': tfds.features.Text(),
    }
  )


def dataset_info(
  builder: tfds.core.DatasetBuilder, description: str, homepage: str, citation: str
) -> tfds.core.DatasetInfo:
  return tfds.core.DatasetInfo(
    builder=builder,
    description=description,
    features=features(),
    homepage=homepage,
    citation=citation,
    disable_shuffling=True,
    metadata=tfds.core.MetadataDict(),
  )


class SkipsCorruptImages:
  """Builder mixin: the `skip_corrupt_images` keyword of `tfds.builder(...)`."""

  def __init__(self, *, skip_corrupt_images: bool = False, **kwargs):
    self.skip_corrupt_images = bool(skip_corrupt_images)
    super().__init__(**kwargs)

  def record_source(self, root: str) -> None:
    """Keeps the folder the data set is prepared from in its metadata
    (`prepared_from`), so that every later run can say where its data came from."""
    self.info.metadata['prepared_from'] = os.fspath(root)

  def skipped_images(self) -> list[str] | None:
    """The list skipped paths are appended to, or None when not skipping."""
    if not self.skip_corrupt_images:
      return None
    return self.info.metadata.setdefault('skipped_images', [])


def manual_root(dl_manager: tfds.download.DownloadManager, layout: str) -> str:
  """The data set folder under (or at) `dl_manager.manual_dir`."""
  try:
    manual_dir = os.fspath(dl_manager.manual_dir)
  except AssertionError as e:  # tfds' way of saying: absent or empty
    named = re.search(r'Manual directory (.*) does not exist', str(e))
    raise folders.DatasetLayoutError(
      layout,
      named[1] if named else 'manual_dir',
      'the folder does not exist or is empty',
      folders.TOP_LEVEL[layout],
      [],
    ) from e
  return records_lib.find_root(layout, manual_dir)


def generate_examples(
  root: str, split_records: Sequence[records_lib.Record], skipped: list[str] | None = None
) -> Iterator[tuple[str, dict]]:
  """(key, example) pairs of `split_records`, the image read from `root`.

  Args:
    root: the data set folder.
    split_records: the records of one split.
    skipped: None to fail on an unreadable image; else a list to which the
      path of each unreadable image is appended instead.
  Raises:
    images.CorruptImageError: an image cannot be decoded (its path is named).
  """
  bad = 0
  for record in split_records:
    try:
      image = images.tfds_image(os.path.join(root, record.path))
    except images.CorruptImageError as error:
      if skipped is None:
        raise
      logging.warning('config.data.skip_corrupt_images: leaving out %s', error.path)
      skipped.append(record.path)
      bad += 1
      continue
    yield (
      record.path,
      {
        'image': image,
        'id': record.id,
        'camera': record.camera,
        'modality': record.modality,
        'path': record.path,
      },
    )
  if bad:
    logging.warning(
      'Skipped %d unreadable of %d images of the split in %s.', bad, len(split_records), root
    )
