"""Fixed-shape evaluation batches of chosen test images (queries or gallery)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from cal_jax.data.augment import normalize
from cal_jax.data.images import resize_images
from cal_jax.data.splits import SplitArrays


def create_eval_dataset(
  split: SplitArrays,
  indices: Sequence[int] | np.ndarray,
  *,
  image_size: tuple[int, int],
  batch_size: int,
  flip: bool = False,
  local_devices: int | None = None,
) -> tf.data.Dataset:
  """Deterministic fixed-shape batches of the given examples (query or gallery).

  The images are decoded and resized once, here: build the dataset once and
  iterate it at every evaluation. The last batch is padded by repeating the
  first example, with 'mask' False on the padding, so a jitted embedding
  function compiles once.

  Args:
    split: the test split.
    indices: example indices into `split`, in the order the features are
      wanted.
    image_size: (height, width).
    batch_size: images per batch (over all local devices).
    flip: also return the mirrored images (config.data.eval_flip), for the
      caller to average the two features.
    local_devices: when given, every array gets a leading [local_devices]
      axis (batch_size must be divisible by it), as ``jax.pmap`` wants.

  Returns:
    A re-iterable dataset of {'image': float32 [B, H, W, 3], 'mask': bool [B],
    'index': int64 [B] (example index into split)}, plus 'image_flipped' when
    `flip`.
  """
  indices = np.asarray(indices, dtype=np.int64).ravel()
  if not indices.size:
    raise ValueError('no examples to evaluate')
  if indices.min() < 0 or indices.max() >= len(split):
    raise ValueError(f'indices must lie in [0, {len(split)})')
  if local_devices and batch_size % local_devices:
    raise ValueError(
      f'batch_size={batch_size} (config.data.eval_batch_size) '
      f'must be divisible by local_devices={local_devices}'
    )
  pixels = resize_images(split.image[indices], image_size)
  num_batches = -(-indices.size // batch_size)
  rows = np.zeros(num_batches * batch_size, np.int64)
  rows[: indices.size] = np.arange(indices.size)

  def load(b: np.int64):
    chosen = rows[b * batch_size : (b + 1) * batch_size]
    return pixels[chosen], indices[chosen]

  normalize_batch = tf.function(normalize, jit_compile=True)

  def batch(b: tf.Tensor) -> dict[str, tf.Tensor]:
    images, index = tf.numpy_function(load, [b], [tf.uint8, tf.int64])
    images = normalize_batch(tf.ensure_shape(images, (batch_size,) + pixels.shape[1:]))
    position = b * batch_size + tf.range(batch_size, dtype=tf.int64)
    out = {
      'image': images,
      'mask': position < indices.size,
      'index': tf.ensure_shape(index, [batch_size]),
    }
    if flip:
      out['image_flipped'] = tf.reverse(images, axis=[2])
    if local_devices:
      out = {k: tf.reshape(v, [local_devices, -1] + v.shape[1:].as_list()) for k, v in out.items()}
    return out

  dataset = (
    tf.data.Dataset.range(num_batches).map(batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
  )
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)
