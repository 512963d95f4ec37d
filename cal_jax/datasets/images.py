"""Reads data set images as 3-channel uint8, naming the file when one is bad.

Grayscale and thermal images (RegDB's thermal BMPs, for instance) become three
equal channels, as PIL's `convert('RGB')` makes them and as the reference code
(`Image.open(...)` then `np.array`, with `ToPILImage` on 3-channel inputs) feeds
them to the network.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError


class CorruptImageError(ValueError):
  """An image file cannot be decoded; `path` names it."""

  def __init__(self, path: str, reason: str):
    self.path = path
    super().__init__(f'cannot decode image {path!r}: {reason}. Copy this file '
                     'again from the original archive, or leave such files out with '
                     '--config.data.skip_corrupt_images=True (they are counted and named).')


def _open(path: str) -> tuple[bytes, Image.Image]:
  try:
    with open(path, 'rb') as f:
      data = f.read()
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel: a truncated file fails here
  except UnidentifiedImageError as e:
    raise CorruptImageError(os.fspath(path), 'not an image file PIL can '
                            'identify (unknown format or cut short)') from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptImageError(os.fspath(path), f'{type(e).__name__}: {e}') from e
  return data, image


def read_rgb(path: str) -> np.ndarray:
  """The image at `path` as a [H, W, 3] uint8 array."""
  _, image = _open(path)
  return np.asarray(image.convert('RGB'))


def tfds_image(path: str) -> bytes:
  """Encoded bytes to hand `tfds.features.Image(shape=(None, None, 3))`.

  A 3-channel JPEG or PNG is passed as its own bytes (no re-encoding, no loss);
  anything else (BMP, grayscale) is converted to 3 channels and encoded as
  lossless PNG here (PIL is much faster at it than tfds' TensorFlow encoder).
  Either way the file is fully decoded first, so a corrupt file fails with its
  path named.
  """
  data, image = _open(path)
  if image.format in ('JPEG', 'PNG') and image.mode == 'RGB':
    return data
  buffer = io.BytesIO()
  image.convert('RGB').save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()
