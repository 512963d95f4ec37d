"""What the three VI-ReID tfds builders share: features, info, examples.

Every example of `sysu_mm01`, `regdb` and `llcm` has the same features:
  image     [H, W, 3] uint8 (grayscale and thermal images as 3 equal channels)
  id        int32, the data set's own identity number (not re-mapped)
  camera    int32, the data set's own camera number
  modality  int32, 0 visible, 1 infrared / near-infrared / thermal
  path      text, the image's path relative to the data set root ('/')
Examples keep the order of `records.list_records` (sorted by id, camera, path):
shuffling is disabled, so reading a split in order gives that listing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from cal_jax.datasets import images
from cal_jax.datasets import records as records_lib


def features() -> tfds.features.FeaturesDict:
  """The feature dictionary every VI-ReID builder shares (module doc)."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3)),
      'id': tfds.features.Scalar(dtype=np.int32),
      'camera': tfds.features.Scalar(dtype=np.int32),
      'modality': tfds.features.Scalar(dtype=np.int32),
      'path': tfds.features.Text(),
  })


def dataset_info(builder: tfds.core.DatasetBuilder, description: str,
                 homepage: str, citation: str) -> tfds.core.DatasetInfo:
  return tfds.core.DatasetInfo(
      builder=builder, description=description, features=features(),
      homepage=homepage, citation=citation, disable_shuffling=True)


def manual_root(dl_manager: tfds.download.DownloadManager, layout: str) -> str:
  """The data set folder under (or at) `dl_manager.manual_dir`."""
  try:
    manual_dir = os.fspath(dl_manager.manual_dir)
  except AssertionError as e:  # tfds' way of saying: absent or empty
    named = re.search(r'Manual directory (.*) does not exist', str(e))
    raise records_lib.DatasetLayoutError(
        layout, named[1] if named else 'manual_dir',
        'the folder does not exist or is empty',
        records_lib.TOP_LEVEL[layout], []) from e
  return records_lib.find_root(layout, manual_dir)


def generate_examples(root: str, split_records: Sequence[records_lib.Record]
                      ) -> Iterator[tuple[str, dict]]:
  """(key, example) pairs of `split_records`, the image read from `root`.

  Raises:
    images.CorruptImageError: an image cannot be decoded (its path is named).
  """
  for record in split_records:
    yield record.path, {
        'image': images.tfds_image(os.path.join(root, record.path)),
        'id': record.id,
        'camera': record.camera,
        'modality': record.modality,
        'path': record.path,
    }
