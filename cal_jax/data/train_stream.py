"""The cross-modal training stream: the sampler's batches, augmented, for ``jax.pmap``.

As in AGW / CAJ (mangye16/Cross-Modal-Re-ID-baseline: ``pre_process_sysu.py``,
``data_loader.py``), every image is decoded and resized once
(`cal_jax.data.images.resize_images`) and held in memory as uint8
``[N, H, W, 3]``; only the random augmentations (`cal_jax.data.augment`) run
per step. Each step maps to the sampler's example indices
(`cal_jax.data.sampler`); the stream gathers those images and augments the
whole step's batch at once, laid out ``[local_devices, per_device_batch, ...]``.

Randomness: per step, one stateless uniform draw of ``[global batch,
NUM_UNIFORMS]`` keyed by (seed, step); an image uses the row of its position
in the global batch. A run resumed at step s therefore sees the same images
as an uninterrupted one, whatever the host layout.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from cal_jax.data import sampler as sampler_lib
from cal_jax.data.augment import NUM_UNIFORMS, TrainTransform, augment
from cal_jax.data.images import resize_images
from cal_jax.data.splits import SplitArrays

_ALG = 'philox'


def create_train_iterator(
  split: SplitArrays,
  sampler: sampler_lib.CrossModalIdentitySampler,
  transform: TrainTransform,
  *,
  seed: int | None = None,
  start_step: int = 0,
  num_steps: int | None = None,
  pixels: np.ndarray | None = None,
  prefetch: int = 2,
  device_prefetch: int = 0,
  camera_class: np.ndarray | None = None,
) -> Iterator[dict[str, Any]]:
  """This host's training batches for ``jax.pmap``, from `start_step` on.

  Args:
    split: the training split; the sampler was built on its id/modality.
    sampler: gives this host's example indices of every step.
    transform: the augmentations.
    seed: augmentation seed; defaults to the sampler's.
    start_step: first step produced (resume point).
    num_steps: steps produced; None for an endless stream.
    pixels: ``resize_images(split.image, transform.image_size)`` when already
      computed (it takes seconds for SYSU-MM01).
    prefetch: host-side batches prepared ahead.
    device_prefetch: when > 0, batches are put on the local devices this many
      steps ahead (``flax.jax_utils.prefetch_to_device``); requires
      sampler.local_devices == jax.local_device_count().
    camera_class: [N] int32 camera class of each example
      (`specs.camera_class_index`): when given, batches also hold it as
      'camera' (Table 4's ICA&CCA needs it).

  Returns:
    An iterator of {'image': float32 [L, B, H, W, 3], 'label': int32 [L, B],
    'modality': int32 [L, B]}, L = sampler.local_devices,
    B = sampler.per_device_batch; numpy arrays, or device arrays with
    device_prefetch.
  """
  if len(split) != len(sampler.labels):
    raise ValueError(
      f'the sampler covers {len(sampler.labels)} examples, the split has {len(split)}'
    )
  if pixels is None:
    pixels = resize_images(split.image, transform.image_size)
  if pixels.shape != (len(split),) + tuple(transform.image_size) + (3,):
    raise ValueError(
      f'pixels {pixels.shape} do not match the split and image size {transform.image_size}'
    )
  local, per_device = sampler.local_devices, sampler.per_device_batch
  size = local * per_device
  global_size = sampler.num_shards * per_device
  seed = sampler.seed if seed is None else seed
  base_key = tf.constant([seed % 2**63, 0], tf.int64)
  # XLA fuses the elementwise work: about 5x faster than TF's kernels here.
  augment_batch = tf.function(functools.partial(augment, transform=transform), jit_compile=True)

  cameras = None if camera_class is None else np.asarray(camera_class, np.int32)

  def load(step: np.int64):
    batch = sampler.batch_indices(int(step))
    index = batch.index.ravel()
    return (
      pixels[index],
      batch.label.ravel(),
      batch.modality.ravel(),
      batch.position.ravel(),
      cameras[index] if cameras is not None else np.zeros(index.shape, np.int32),
    )

  def step_batch(step: tf.Tensor) -> dict[str, tf.Tensor]:
    images, label, modality, position, camera = tf.numpy_function(
      load, [step], [tf.uint8, tf.int32, tf.int32, tf.int64, tf.int32]
    )
    images = tf.ensure_shape(images, [size] + list(pixels.shape[1:]))
    label, modality, position = (tf.ensure_shape(x, [size]) for x in (label, modality, position))
    key = tf.random.experimental.stateless_fold_in(base_key, step, alg=_ALG)
    uniforms = tf.random.stateless_uniform([global_size, NUM_UNIFORMS], key, alg=_ALG)
    images = augment_batch(images, modality, tf.gather(uniforms, position))
    shape = [local, per_device]
    out = {
      'image': tf.reshape(images, shape + list(pixels.shape[1:])),
      'label': tf.reshape(label, shape),
      'modality': tf.reshape(modality, shape),
    }
    if cameras is not None:
      out['camera'] = tf.reshape(tf.ensure_shape(camera, [size]), shape)
    return out

  stop = 2**62 if num_steps is None else start_step + num_steps
  dataset = (
    tf.data.Dataset.range(start_step, stop)
    .map(step_batch, num_parallel_calls=tf.data.AUTOTUNE)
    .prefetch(prefetch)
  )
  options = tf.data.Options()
  options.deterministic = True
  iterator = dataset.with_options(options).as_numpy_iterator()
  if device_prefetch:
    from flax import jax_utils

    iterator = jax_utils.prefetch_to_device(iterator, device_prefetch)
  return iterator
