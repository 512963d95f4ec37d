"""tf.data pipelines: the cross-modal training stream and the evaluation sets.

As in AGW / CAJ (mangye16/Cross-Modal-Re-ID-baseline: ``pre_process_sysu.py``,
``data_loader.py``), every image is decoded and resized once with PIL
(``resize((W, H), LANCZOS)``, the old ``ANTIALIAS``) and held in memory as
uint8 ``[N, H, W, 3]``; only the random augmentations run per step. The
training stream maps each step to the sampler's example indices
(`cal_jax.sampler`), gathers those images and augments the whole step's batch
with vectorised TF ops, laid out ``[local_devices, per_device_batch, ...]``
for ``jax.pmap``.

Training transforms, in the order of CAJ's ``ICCV21_CAJ/data_loader.py``:
``Pad(pad)`` (zeros) + ``RandomCrop`` to the input size,
``RandomHorizontalFlip``, ``ToTensor`` + ImageNet ``Normalize``,
``ChannelRandomErasing`` (writes a fixed value into the normalised tensor),
then the channel augmentation: visible images ``ChannelExchange(gray=2)`` (one
of R, G, B copied to all three channels), infrared ones
``ChannelAdapGray(0.5)``. Evaluation: resize and normalise only.

Randomness: per step, one stateless uniform draw of ``[global batch,
NUM_UNIFORMS]`` keyed by (seed, step); an image uses the row of its position
in the global batch. A run resumed at step s therefore sees the same images
as an uninterrupted one, whatever the host layout.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image

from cal_jax import sampler as sampler_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CAJ's ChannelRandomErasing: area fraction, minimum aspect ratio, attempts,
# and the fill value, written into the already normalised tensor.
ERASING_AREA = (0.02, 0.4)
ERASING_MIN_ASPECT = 0.3
ERASING_ATTEMPTS = 100
ERASING_FILL = (0.4914, 0.4822, 0.4465)
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # CAJ's grayscale

# Columns of the per-image uniform draws.
(U_CROP_TOP, U_CROP_LEFT, U_FLIP, U_ERASE, U_ERASE_TOP, U_ERASE_LEFT,
 U_CHANNEL, U_CHANNEL_CHOICE, U_GRAY) = range(9)
U_ERASE_AREA = slice(9, 9 + ERASING_ATTEMPTS)
U_ERASE_ASPECT = slice(9 + ERASING_ATTEMPTS, 9 + 2 * ERASING_ATTEMPTS)
NUM_UNIFORMS = 9 + 2 * ERASING_ATTEMPTS
_ALG = "philox"


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
class TrainTransform:
  """Training image transform; every augmentation can be switched off.

  Attributes:
    image_size: (height, width) of the network input.
    pad: zero padding before the random crop back to image_size; 0 disables.
    flip: random horizontal flip with probability 0.5.
    random_erasing: probability of CAJ's ChannelRandomErasing; 0 disables.
    channel_aug: CAJ channel augmentation (module docstring).
    channel_aug_prob: probability that a visible image is channel-exchanged.
      CAJ feeds every visible image twice, once plain and once exchanged;
      with one view per image, 0.5 keeps that mix.
  """

  image_size: tuple[int, int] = (288, 144)
  pad: int = 10
  flip: bool = True
  random_erasing: float = 0.5
  channel_aug: bool = True
  channel_aug_prob: float = 0.5

  @classmethod
  def from_config(cls, data: Any) -> TrainTransform:
    """Reads config.data (channel_aug_prob defaults to 0.5 when absent)."""
    return cls(
        image_size=(int(data.image_height), int(data.image_width)),
        pad=int(data.pad),
        flip=bool(data.flip),
        random_erasing=float(data.random_erasing),
        channel_aug=bool(data.channel_aug),
        channel_aug_prob=float(data.get("channel_aug_prob", 0.5)))


# ------------------------------------------------------------------ loading ---


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
    raise ValueError("the split is empty")
  full = {key: np.concatenate(values) for key, values in columns.items()}
  n = len(full["id"])
  paths = full.get("path", np.full(n, b"", object))
  return SplitArrays(
      image=full["image"].astype(object),
      id=full["id"].astype(np.int32),
      camera=full.get("camera", np.full(n, -1)).astype(np.int32),
      modality=full["modality"].astype(np.int32),
      path=np.array([p.decode() if isinstance(p, bytes) else str(p)
                     for p in paths], dtype=object))


def load_builder_split(builder: Any, split: str) -> SplitArrays:
  """Reads a split of a prepared tfds builder, images left encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  dataset = builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={"image": tfds.decode.SkipDecoding()})
  return load_split(dataset)


def load_tfds_split(name: str, split: str, *, data_dir: str | None = None,
                    builder_config: str = "") -> SplitArrays:
  """Reads a split of one of the registered builders (sysu_mm01, regdb, llcm).

  Args:
    name: builder name (config.data.name).
    split: 'train' or 'test'.
    data_dir: tfds data_dir; None or '' for the tfds default.
    builder_config: e.g. 'trial_1' for RegDB; '' for the default config.

  Returns:
    The split's columns.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Registers the builders.
  import cal_jax.datasets  # pylint: disable=g-import-not-at-top,unused-import
  full_name = f"{name}/{builder_config}" if builder_config else name
  builder = tfds.builder(full_name, data_dir=data_dir or None)
  return load_builder_split(builder, split)


def resize_images(encoded: Sequence[bytes], image_size: tuple[int, int], *,
                  num_threads: int | None = None) -> np.ndarray:
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
      image = image.convert("RGB") if image.mode != "RGB" else image
      return np.asarray(image.resize((width, height),
                                     Image.Resampling.LANCZOS))

  out = np.empty((len(encoded), height, width, 3), np.uint8)
  chunk = 4096  # bounds the finished-but-unread results held by the pool
  with concurrent.futures.ThreadPoolExecutor(
      num_threads or os.cpu_count()) as pool:
    for start in range(0, len(encoded), chunk):
      for i, pixels in enumerate(pool.map(one, encoded[start:start + chunk])):
        out[start + i] = pixels
  return out


# ------------------------------------------------------------ augmentations ---


def _randint(uniform: tf.Tensor, maxval: tf.Tensor | int) -> tf.Tensor:
  """Uniform integers in [0, maxval) from uniforms in [0, 1)."""
  maxval = tf.cast(maxval, tf.int32)
  draw = tf.cast(tf.floor(uniform * tf.cast(maxval, tf.float32)), tf.int32)
  return tf.minimum(draw, maxval - 1)


def pad_crop_flip(pixels: tf.Tensor, pad: int, flip: bool,
                  uniforms: tf.Tensor) -> tf.Tensor:
  """``Pad(pad)`` (zeros), ``RandomCrop`` back, ``RandomHorizontalFlip``.

  Args:
    pixels: uint8 [N, H, W, 3].
    pad: padding; 0 for no crop.
    flip: whether to flip (each image with probability 0.5).
    uniforms: [N, NUM_UNIFORMS] in [0, 1).

  Returns:
    uint8 [N, H, W, 3].
  """
  height, width = pixels.shape[1], pixels.shape[2]
  top = _randint(uniforms[:, U_CROP_TOP], 2 * pad + 1)
  left = _randint(uniforms[:, U_CROP_LEFT], 2 * pad + 1)
  cols = tf.range(width)[None, :]
  if flip:
    mirrored = uniforms[:, U_FLIP] < 0.5
    cols = tf.where(mirrored[:, None], width - 1 - cols, cols)
  padded = tf.pad(pixels, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
  rows = top[:, None] + tf.range(height)[None, :]
  out = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(out, cols + left[:, None], axis=2, batch_dims=1)


def erasing_boxes(uniforms: tf.Tensor, probability: float, height: int,
                  width: int) -> tf.Tensor:
  """CAJ's ``ChannelRandomErasing`` rectangles (Zhong et al.).

  With the given probability, up to ERASING_ATTEMPTS attempts draw an area
  fraction in ERASING_AREA and an aspect ratio in [0.3, 1/0.3]; the first
  rectangle that fits is erased.

  Args:
    uniforms: [N, NUM_UNIFORMS] in [0, 1).

  Returns:
    int32 [N, 4]: top, left, height, width; height 0 where nothing is erased.
  """
  low, high = ERASING_AREA
  area = (low + uniforms[:, U_ERASE_AREA] * (high - low)) * height * width
  aspect = ERASING_MIN_ASPECT + uniforms[:, U_ERASE_ASPECT] * (
      1 / ERASING_MIN_ASPECT - ERASING_MIN_ASPECT)
  h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (h < height) & (w < width)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
  h = tf.gather(h, first, batch_dims=1)
  w = tf.gather(w, first, batch_dims=1)
  top = _randint(uniforms[:, U_ERASE_TOP], height - h + 1)
  left = _randint(uniforms[:, U_ERASE_LEFT], width - w + 1)
  erase = (uniforms[:, U_ERASE] < probability) & tf.reduce_any(fits, axis=1)
  return tf.stack([top, left, tf.where(erase, h, 0), w], axis=1)


def channel_mixing(modality: tf.Tensor, uniforms: tf.Tensor,
                   visible_prob: float) -> tf.Tensor:
  """CAJ channel augmentation as [N, 3, 3] matrices M (out = x @ M).

  Visible: with probability `visible_prob`, ``ChannelExchange(gray=2)``: one of
  R, G, B, uniformly, copied to all channels. Infrared
  (``ChannelAdapGray(0.5)``): one of {R, G, B, other} uniformly; a channel is
  copied to all three, 'other' turns the image grayscale (0.2989 R + 0.587 G +
  0.114 B) with probability 0.5 and otherwise leaves it.
  """
  def copy(channel):
    return tf.tile(tf.one_hot(channel, 3)[:, :, None], [1, 1, 3])

  n = tf.shape(modality)[0]
  identity = tf.eye(3, batch_shape=[n])
  gray = tf.tile(tf.constant(GRAY_WEIGHTS)[None, :, None], [n, 1, 3])
  exchange = copy(_randint(uniforms[:, U_CHANNEL_CHOICE], 3))
  visible = tf.where((uniforms[:, U_CHANNEL] < visible_prob)[:, None, None],
                     exchange, identity)
  choice = _randint(uniforms[:, U_CHANNEL_CHOICE], 4)
  other = tf.where((uniforms[:, U_GRAY] <= 0.5)[:, None, None], gray, identity)
  infrared = tf.where((choice < 3)[:, None, None],
                      copy(tf.minimum(choice, 2)), other)
  return tf.where(
      tf.equal(modality, sampler_lib.VISIBLE)[:, None, None], visible, infrared)


def normalize_erase_mix(pixels: tf.Tensor, boxes: tf.Tensor | None,
                        mixing: tf.Tensor) -> tf.Tensor:
  """``Normalize``, then erase `boxes`, then mix channels, as one affine map.

  Args:
    pixels: uint8 [N, H, W, 3].
    boxes: int32 [N, 4] from `erasing_boxes` (height 0: none); None: no
      erasing.
    mixing: [N, 3, 3] from `channel_mixing` (identity: none).

  Returns:
    float32 [N, H, W, 3].
  """
  scale = 1.0 / (255.0 * tf.constant(IMAGENET_STD))
  bias = -tf.constant(IMAGENET_MEAN) / tf.constant(IMAGENET_STD)
  out = tf.einsum("nhwc,ncd->nhwd", tf.cast(pixels, tf.float32),
                  scale[None, :, None] * mixing)
  out += tf.einsum("c,ncd->nd", bias, mixing)[:, None, None, :]
  if boxes is None:
    return out
  height, width = pixels.shape[1], pixels.shape[2]
  top, left, h, w = (boxes[:, i][:, None] for i in range(4))
  rows = tf.range(height)[None, :]
  cols = tf.range(width)[None, :]
  inside = (((rows >= top) & (rows < top + h))[:, :, None] &
            ((cols >= left) & (cols < left + w))[:, None, :])
  fill = tf.einsum("c,ncd->nd", tf.constant(ERASING_FILL), mixing)
  return tf.where(inside[..., None], fill[:, None, None, :], out)


def augment(pixels: tf.Tensor, modality: tf.Tensor, uniforms: tf.Tensor,
            transform: TrainTransform) -> tf.Tensor:
  """The training transform of a batch of resized images.

  Args:
    pixels: uint8 [N, H, W, 3], already at transform.image_size.
    modality: int32 [N].
    uniforms: [N, NUM_UNIFORMS] in [0, 1), each image's random numbers.
    transform: the augmentations.

  Returns:
    float32 [N, H, W, 3], normalised.
  """
  height, width = transform.image_size
  if transform.pad or transform.flip:
    pixels = pad_crop_flip(pixels, transform.pad, transform.flip, uniforms)
  boxes = None
  if transform.random_erasing > 0:
    boxes = erasing_boxes(uniforms, transform.random_erasing, height, width)
  if transform.channel_aug:
    mixing = channel_mixing(modality, uniforms, transform.channel_aug_prob)
  else:
    mixing = tf.eye(3, batch_shape=[tf.shape(modality)[0]])
  return normalize_erase_mix(pixels, boxes, mixing)


def normalize(pixels: tf.Tensor) -> tf.Tensor:
  """[..., 3] values in [0, 255] -> ImageNet-normalised float32."""
  return ((tf.cast(pixels, tf.float32) / 255.0 - tf.constant(IMAGENET_MEAN)) /
          tf.constant(IMAGENET_STD))


# ----------------------------------------------------------------- training ---


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

  Returns:
    An iterator of {'image': float32 [L, B, H, W, 3], 'label': int32 [L, B],
    'modality': int32 [L, B]}, L = sampler.local_devices,
    B = sampler.per_device_batch; numpy arrays, or device arrays with
    device_prefetch.
  """
  if len(split) != len(sampler.labels):
    raise ValueError(f"the sampler covers {len(sampler.labels)} examples, "
                     f"the split has {len(split)}")
  if pixels is None:
    pixels = resize_images(split.image, transform.image_size)
  if pixels.shape != (len(split),) + tuple(transform.image_size) + (3,):
    raise ValueError(f"pixels {pixels.shape} do not match the split and "
                     f"image size {transform.image_size}")
  local, per_device = sampler.local_devices, sampler.per_device_batch
  size = local * per_device
  global_size = sampler.num_shards * per_device
  seed = sampler.seed if seed is None else seed
  base_key = tf.constant([seed % 2**63, 0], tf.int64)
  # XLA fuses the elementwise work: about 5x faster than TF's kernels here.
  augment_batch = tf.function(
      functools.partial(augment, transform=transform), jit_compile=True)

  def load(step: np.int64):
    batch = sampler.batch_indices(int(step))
    return (pixels[batch.index.ravel()], batch.label.ravel(),
            batch.modality.ravel(), batch.position.ravel())

  def step_batch(step: tf.Tensor) -> dict[str, tf.Tensor]:
    images, label, modality, position = tf.numpy_function(
        load, [step], [tf.uint8, tf.int32, tf.int32, tf.int64])
    images = tf.ensure_shape(images, [size] + list(pixels.shape[1:]))
    label, modality, position = (tf.ensure_shape(x, [size])
                                 for x in (label, modality, position))
    key = tf.random.experimental.stateless_fold_in(base_key, step, alg=_ALG)
    uniforms = tf.random.stateless_uniform([global_size, NUM_UNIFORMS], key,
                                           alg=_ALG)
    images = augment_batch(images, modality, tf.gather(uniforms, position))
    shape = [local, per_device]
    return {"image": tf.reshape(images, shape + list(pixels.shape[1:])),
            "label": tf.reshape(label, shape),
            "modality": tf.reshape(modality, shape)}

  stop = 2**62 if num_steps is None else start_step + num_steps
  dataset = tf.data.Dataset.range(start_step, stop).map(
      step_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(prefetch)
  options = tf.data.Options()
  options.deterministic = True
  iterator = dataset.with_options(options).as_numpy_iterator()
  if device_prefetch:
    from flax import jax_utils  # pylint: disable=g-import-not-at-top
    iterator = jax_utils.prefetch_to_device(iterator, device_prefetch)
  return iterator


# --------------------------------------------------------------- evaluation ---


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
    raise ValueError("no examples to evaluate")
  if indices.min() < 0 or indices.max() >= len(split):
    raise ValueError(f"indices must lie in [0, {len(split)})")
  if local_devices and batch_size % local_devices:
    raise ValueError(f"batch_size={batch_size} (config.data.eval_batch_size) "
                     f"must be divisible by local_devices={local_devices}")
  pixels = resize_images(split.image[indices], image_size)
  num_batches = -(-indices.size // batch_size)
  rows = np.zeros(num_batches * batch_size, np.int64)
  rows[:indices.size] = np.arange(indices.size)

  def load(b: np.int64):
    chosen = rows[b * batch_size:(b + 1) * batch_size]
    return pixels[chosen], indices[chosen]

  normalize_batch = tf.function(normalize, jit_compile=True)

  def batch(b: tf.Tensor) -> dict[str, tf.Tensor]:
    images, index = tf.numpy_function(load, [b], [tf.uint8, tf.int64])
    images = normalize_batch(
        tf.ensure_shape(images, (batch_size,) + pixels.shape[1:]))
    position = b * batch_size + tf.range(batch_size, dtype=tf.int64)
    out = {"image": images, "mask": position < indices.size,
           "index": tf.ensure_shape(index, [batch_size])}
    if flip:
      out["image_flipped"] = tf.reverse(images, axis=[2])
    if local_devices:
      out = {k: tf.reshape(v, [local_devices, -1] + v.shape[1:].as_list())
             for k, v in out.items()}
    return out

  dataset = tf.data.Dataset.range(num_batches).map(
      batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)
