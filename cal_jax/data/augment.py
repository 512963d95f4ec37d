"""The training transform of CAJ, as vectorised TF ops on a whole step's batch.

In the order of CAJ's ``ICCV21_CAJ/data_loader.py`` (mangye16/Cross-Modal-Re-ID-baseline
family): ``Pad(pad)`` (zeros) + ``RandomCrop`` to the input size,
``RandomHorizontalFlip``, ``ToTensor`` + ImageNet ``Normalize``,
``ChannelRandomErasing`` (writes a fixed value into the normalised tensor),
then the channel augmentation: visible images ``ChannelExchange(gray=2)`` (one
of R, G, B copied to all three channels), infrared ones
``ChannelAdapGray(0.5)``. Evaluation: resize and normalise only (`normalize`).

Randomness: every image reads its own row of ``[N, NUM_UNIFORMS]`` uniforms
(`cal_jax.data.train_stream` draws them per step, keyed by (seed, step)).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from cal_jax.data.modality import VISIBLE

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
(
  U_CROP_TOP,
  U_CROP_LEFT,
  U_FLIP,
  U_ERASE,
  U_ERASE_TOP,
  U_ERASE_LEFT,
  U_CHANNEL,
  U_CHANNEL_CHOICE,
  U_GRAY,
) = range(9)
U_ERASE_AREA = slice(9, 9 + ERASING_ATTEMPTS)
U_ERASE_ASPECT = slice(9 + ERASING_ATTEMPTS, 9 + 2 * ERASING_ATTEMPTS)
NUM_UNIFORMS = 9 + 2 * ERASING_ATTEMPTS


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
      channel_aug_prob=float(data.channel_aug_prob),
    )


def _randint(uniform: tf.Tensor, maxval: tf.Tensor | int) -> tf.Tensor:
  """Uniform integers in [0, maxval) from uniforms in [0, 1)."""
  maxval = tf.cast(maxval, tf.int32)
  draw = tf.cast(tf.floor(uniform * tf.cast(maxval, tf.float32)), tf.int32)
  return tf.minimum(draw, maxval - 1)


def pad_crop_flip(pixels: tf.Tensor, pad: int, flip: bool, uniforms: tf.Tensor) -> tf.Tensor:
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


def erasing_boxes(uniforms: tf.Tensor, probability: float, height: int, width: int) -> tf.Tensor:
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
    1 / ERASING_MIN_ASPECT - ERASING_MIN_ASPECT
  )
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


def channel_mixing(modality: tf.Tensor, uniforms: tf.Tensor, visible_prob: float) -> tf.Tensor:
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
  visible = tf.where((uniforms[:, U_CHANNEL] < visible_prob)[:, None, None], exchange, identity)
  choice = _randint(uniforms[:, U_CHANNEL_CHOICE], 4)
  other = tf.where((uniforms[:, U_GRAY] <= 0.5)[:, None, None], gray, identity)
  infrared = tf.where((choice < 3)[:, None, None], copy(tf.minimum(choice, 2)), other)
  return tf.where(tf.equal(modality, VISIBLE)[:, None, None], visible, infrared)


def normalize_erase_mix(pixels: tf.Tensor, boxes: tf.Tensor | None, mixing: tf.Tensor) -> tf.Tensor:
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
  out = tf.einsum('nhwc,ncd->nhwd', tf.cast(pixels, tf.float32), scale[None, :, None] * mixing)
  out += tf.einsum('c,ncd->nd', bias, mixing)[:, None, None, :]
  if boxes is None:
    return out
  height, width = pixels.shape[1], pixels.shape[2]
  top, left, h, w = (boxes[:, i][:, None] for i in range(4))
  rows = tf.range(height)[None, :]
  cols = tf.range(width)[None, :]
  inside = ((rows >= top) & (rows < top + h))[:, :, None] & ((cols >= left) & (cols < left + w))[
    :, None, :
  ]
  fill = tf.einsum('c,ncd->nd', tf.constant(ERASING_FILL), mixing)
  return tf.where(inside[..., None], fill[:, None, None, :], out)


def augment(
  pixels: tf.Tensor, modality: tf.Tensor, uniforms: tf.Tensor, transform: TrainTransform
) -> tf.Tensor:
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
  return (tf.cast(pixels, tf.float32) / 255.0 - tf.constant(IMAGENET_MEAN)) / tf.constant(
    IMAGENET_STD
  )
