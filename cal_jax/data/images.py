"""Images read with PIL: the builders' decoding (naming a bad file) and the resizing.

  tfds_image(path)             a file's bytes for the tfds builders, fully decoded
                               first, so that a corrupt file fails with its path named
  resize_images(encoded, size)  decode and resize as the standard code does, once per
                               split (AGW / CAJ: ``resize((W, H), LANCZOS)``, the old
                               ``ANTIALIAS``)

Grayscale and thermal images (RegDB's thermal BMPs, for instance) become three
equal channels, as PIL's `convert('RGB')` makes them and as the reference code
(`Image.open(...)` then `np.array`, with `ToPILImage` on 3-channel inputs) feeds
them to the network.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError


class CorruptImageError(ValueError):
  """An image file cannot be decoded; `path` names it."""

  def __init__(self, path: str, reason: str):
    self.path = path
    super().__init__(
      f'cannot decode image {path!r}: {reason}. Copy this file '
      'again from the original archive, or leave such files out with '
      '--config.data.skip_corrupt_images=True (they are counted and named).'
    )


def _open(path: str) -> tuple[bytes, Image.Image]:
  try:
    with open(path, 'rb') as f:
      data = f.read()
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel: a truncated file fails here
  except UnidentifiedImageError as e:
    raise CorruptImageError(
      os.fspath(path), 'not an image file PIL can identify (unknown format or cut short)'
    ) from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptImageError(os.fspath(path), f'{type(e).__name__}: {e}') from e
  return data, image


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


def resize_images(
  encoded: Sequence[bytes], image_size: tuple[int, int], *, num_threads: int | None = None
) -> np.ndarray:
  """Decodes and resizes with PIL's Lanczos filter, as the standard code.

  Args:
    encoded: [N] encoded images; non-RGB ones (grayscale, palette) are
      converted to RGB first.
    image_size: (height, width).
    num_threads: decoding threads (PIL releases the GIL); default all cores.

  Returns:
    uint8 [N, height, width, 3].
  """
  height, width = image_size

  def one(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
      image = image.convert('RGB') if image.mode != 'RGB' else image
      return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS))

  out = np.empty((len(encoded), height, width, 3), np.uint8)
  chunk = 4096  # bounds the finished-but-unread results held by the pool
  with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
    for start in range(0, len(encoded), chunk):
      for i, pixels in enumerate(pool.map(one, encoded[start : start + chunk])):
        out[start + i] = pixels
  return out
