"""Tests of the input pipeline (`cal_jax.data`: augment, images, splits, streams) on tiny data."""

import numpy as np
import pytest
import tensorflow as tf

from cal_jax.data import augment, eval_batches, images, splits, train_stream
from cal_jax.data import sampler as sampler_lib

SOURCE = (40, 20)  # stored image size: every image is resized
SIZE = (32, 16)
OFF = augment.TrainTransform(
  image_size=SIZE, pad=0, flip=False, random_erasing=0.0, channel_aug=False
)
ON = augment.TrainTransform(image_size=SIZE, pad=2)
MEAN, STD = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
ONE_LEVEL = 1.01 / 255 / STD.min()  # one 8-bit level after normalisation


def _png(array: np.ndarray) -> bytes:
  return tf.io.encode_png(array).numpy()


def _normalized(pixels: np.ndarray) -> np.ndarray:
  return (pixels / 255 - MEAN) / STD


@pytest.fixture(scope='module')
def pixels():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (48,) + SOURCE + (3,), dtype=np.uint8)


@pytest.fixture(scope='module')
def split(pixels):
  """6 identities x (4 visible + 4 infrared), PNG-encoded."""
  n = len(pixels)
  features = {
    'image': [_png(p) for p in pixels],
    'id': np.repeat([2, 5, 9, 10, 14, 33], 8).astype(np.int32),
    'camera': np.zeros(n, np.int32),
    'modality': np.tile(np.repeat([0, 1], 4), 6).astype(np.int32),
    'path': [f'cam1/{i:04d}.png' for i in range(n)],
  }
  return splits.load_split(tf.data.Dataset.from_tensor_slices(features))


def _sampler(split, local_devices=2):
  return sampler_lib.CrossModalIdentitySampler(
    split.id, split.modality, num_ids_per_batch=4, num_pos=2, seed=3, local_devices=local_devices
  )


def _batches(split, transform, start_step=0, num_steps=3, seed=1):
  return list(
    train_stream.create_train_iterator(
      split, _sampler(split), transform, seed=seed, start_step=start_step, num_steps=num_steps
    )
  )


def _lanczos_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """numpy Lanczos-3 as Pillow: horizontal pass, 8-bit rounding, vertical."""

  def resample(a, out_size, axis):
    in_size = a.shape[axis]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
      center = (i + 0.5) * scale
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      x = (np.arange(lo, hi) - center + 0.5) / filterscale
      w = np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)
      weights[i, lo:hi] = w / w.sum()
    out = np.tensordot(weights, np.moveaxis(a.astype(np.float64), axis, 0), 1)
    return np.moveaxis(np.clip(np.round(out), 0, 255), 0, axis)

  return resample(resample(image, width, axis=1), height, axis=0)


def _uniforms(n: int, **columns) -> tf.Tensor:
  """[n, NUM_UNIFORMS] of 0.25 with some columns set."""
  u = np.full((n, augment.NUM_UNIFORMS), 0.25, np.float32)
  for name, value in columns.items():
    u[:, getattr(augment, name)] = value
  return tf.constant(u)


def test_load_split_keeps_bytes_and_columns(split, pixels):
  assert len(split) == 48 and split.image.dtype == object
  np.testing.assert_array_equal(tf.io.decode_png(split.image[7]).numpy(), pixels[7])
  assert split.path[3] == 'cam1/0003.png' and split.id[8] == 5
  minimal = splits.load_split(
    tf.data.Dataset.from_tensor_slices({'image': [_png(pixels[0])], 'id': [4], 'modality': [1]})
  )
  assert minimal.camera.tolist() == [-1] and minimal.path.tolist() == ['']


def test_resize_matches_an_independent_lanczos(split, pixels):
  resized = images.resize_images(split.image[:6], SIZE)
  assert resized.shape == (6,) + SIZE + (3,) and resized.dtype == np.uint8
  for i in range(6):
    reference = _lanczos_reference(pixels[i], *SIZE)
    assert np.abs(resized[i] - reference).max() <= 1
  gray = images.resize_images([_png(pixels[0][..., :1])], SIZE)[0]
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_train_batches_are_laid_out_for_pmap(split):
  batches = _batches(split, ON)
  s = _sampler(split)
  assert len(batches) == 3
  for step, batch in enumerate(batches):
    assert set(batch) == {'image', 'label', 'modality'}
    assert batch['image'].shape == (2, 8) + SIZE + (3,)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == batch['modality'].shape == (2, 8)
    assert batch['label'].dtype == batch['modality'].dtype == np.int32
    expected = s.batch_indices(step)
    np.testing.assert_array_equal(batch['label'], expected.label)
    np.testing.assert_array_equal(batch['modality'], expected.modality)


def test_without_augmentation_output_is_resize_and_normalise(split, pixels):
  batch = _batches(split, OFF, num_steps=1)[0]
  index = _sampler(split).batch_indices(0).index
  for d in range(2):
    for j in range(8):
      reference = _lanczos_reference(pixels[index[d, j]], *SIZE)
      np.testing.assert_allclose(batch['image'][d, j], _normalized(reference), atol=ONE_LEVEL)


def test_normalisation_of_a_constant_image():
  constant = tf.fill((1,) + SIZE + (3,), tf.constant(100, tf.uint8))
  out = augment.augment(constant, tf.constant([0]), _uniforms(1), OFF).numpy()
  np.testing.assert_allclose(
    out, np.broadcast_to(_normalized(np.full(3, 100)), out.shape), atol=1e-5
  )
  np.testing.assert_allclose(augment.normalize(constant).numpy(), out, atol=1e-5)


def test_resume_gives_the_uninterrupted_batches(split):
  full = _batches(split, ON, num_steps=5)
  resumed = _batches(split, ON, start_step=3, num_steps=2)
  for a, b in zip(full[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other_seed = _batches(split, ON, start_step=3, num_steps=1, seed=2)[0]
  assert not np.array_equal(other_seed['image'], full[3]['image'])


def test_pad_crop_flip():
  x = np.arange(2 * np.prod(SIZE) * 3).reshape((2,) + SIZE + (3,)) % 251 + 1
  x = tf.constant(x.astype(np.uint8))
  padded = np.pad(x.numpy(), [(0, 0), (3, 3), (3, 3), (0, 0)])
  for top in range(7):
    for left in (0, 4, 6):
      u = _uniforms(
        2,
        U_CROP_TOP=(top + 0.5) / 7,
        U_CROP_LEFT=(left + 0.5) / 7,
        U_FLIP=np.array([0.2, 0.7], np.float32),
      )
      out = augment.pad_crop_flip(x, 3, True, u).numpy()
      window = padded[:, top : top + SIZE[0], left : left + SIZE[1]]
      np.testing.assert_array_equal(out[0], window[0, :, ::-1])  # flipped
      np.testing.assert_array_equal(out[1], window[1])
  np.testing.assert_array_equal(augment.pad_crop_flip(x, 0, False, _uniforms(2)).numpy(), x.numpy())


def test_erasing_boxes():
  u = tf.random.stateless_uniform([500, augment.NUM_UNIFORMS], [0, 1])
  boxes = augment.erasing_boxes(u, 1.0, *SIZE).numpy()
  top, left, h, w = boxes.T
  assert (h > 0).all() and (h < SIZE[0]).all() and (w < SIZE[1]).all()
  assert (top >= 0).all() and (top + h <= SIZE[0]).all()
  assert (left >= 0).all() and (left + w <= SIZE[1]).all()
  fraction = h * w / np.prod(SIZE)
  assert fraction.min() >= 0.01 and fraction.max() <= 0.5
  assert (augment.erasing_boxes(u, 0.0, *SIZE).numpy()[:, 2] == 0).all()
  half = augment.erasing_boxes(u, 0.5, *SIZE).numpy()[:, 2] > 0
  assert 0.4 < half.mean() < 0.6


def test_normalize_erase_mix_is_caj_order():
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, (3,) + SIZE + (3,), dtype=np.uint8)
  boxes = np.array([[2, 3, 5, 4], [0, 0, 0, 9], [10, 1, 3, 15]], np.int32)
  gray = np.tile(np.array(augment.GRAY_WEIGHTS)[:, None], (1, 3))
  mixing = np.stack([np.eye(3), gray, np.tile([[0.0], [1.0], [0.0]], (1, 3))])
  out = augment.normalize_erase_mix(
    tf.constant(x), tf.constant(boxes), tf.constant(mixing, tf.float32)
  ).numpy()
  for i, (top, left, h, w) in enumerate(boxes):
    expected = _normalized(x[i])
    expected[top : top + h, left : left + w] = augment.ERASING_FILL
    expected = expected @ mixing[i]
    np.testing.assert_allclose(out[i], expected, atol=1e-4)


def test_channel_mixing():
  u = tf.random.stateless_uniform([400, augment.NUM_UNIFORMS], [0, 2])
  modality = tf.constant([0, 1] * 200)
  mixing = augment.channel_mixing(modality, u, 0.5).numpy()
  copies = [np.tile(np.eye(3)[:, c : c + 1], (1, 3)) for c in range(3)]
  gray = np.tile(np.array(augment.GRAY_WEIGHTS)[:, None], (1, 3))
  kinds = []
  for m, mix in zip(modality.numpy(), mixing):
    matches = [np.allclose(mix, c) for c in copies]
    allowed = copies + [np.eye(3)] + ([] if m == 0 else [gray])
    assert any(np.allclose(mix, a) for a in allowed)
    kinds.append((m, np.argmax(matches) if any(matches) else -1))
  visible_exchanged = np.mean([k[1] >= 0 for k in kinds if k[0] == 0])
  infrared_copied = np.mean([k[1] >= 0 for k in kinds if k[0] == 1])
  assert 0.4 < visible_exchanged < 0.6  # channel_aug_prob
  assert 0.65 < infrared_copied < 0.85  # 3 of 4 choices
  none = augment.channel_mixing(modality, u, 0.0).numpy()[::2]
  np.testing.assert_array_equal(none, np.broadcast_to(np.eye(3), none.shape))


def test_eval_batches_are_padded_and_ordered(split, pixels):
  indices = [9, 4, 30, 17, 1]
  dataset = eval_batches.create_eval_dataset(
    split, indices, image_size=SIZE, batch_size=4, flip=True
  )
  batches = list(dataset.as_numpy_iterator())
  assert len(batches) == 2
  for batch in batches:
    assert batch['image'].shape == (4,) + SIZE + (3,)
    np.testing.assert_array_equal(batch['image_flipped'], batch['image'][:, :, ::-1])
  mask = np.concatenate([b['mask'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  assert mask.tolist() == [True] * 5 + [False] * 3
  assert index[:5].tolist() == indices
  expected = _normalized(_lanczos_reference(pixels[30], *SIZE))
  np.testing.assert_allclose(batches[0]['image'][2], expected, atol=ONE_LEVEL)
  again = next(dataset.as_numpy_iterator())  # re-iterable, same result
  np.testing.assert_array_equal(again['image'], batches[0]['image'])
  sharded = next(
    eval_batches.create_eval_dataset(
      split, indices, image_size=SIZE, batch_size=4, local_devices=2
    ).as_numpy_iterator()
  )
  assert sharded['image'].shape == (2, 2) + SIZE + (3,)
  assert sharded['mask'].shape == (2, 2)
  np.testing.assert_array_equal(
    sharded['image'].reshape(batches[0]['image'].shape), batches[0]['image']
  )


def test_device_prefetch(split):
  import jax

  s = _sampler(split, local_devices=jax.local_device_count())
  batch = next(train_stream.create_train_iterator(split, s, OFF, num_steps=1, device_prefetch=1))
  assert batch['image'].shape[:2] == (jax.local_device_count(), s.per_device_batch)


def test_camera_classes_ride_along_when_asked(split):
  """Table 4's ICA&CCA: with `camera_class`, each batch also holds the camera class of
  each of its images, in the sampler's order (here the class is the example index, so
  the batch shows which examples it holds)."""
  from cal_jax.data.datasets import specs

  s = _sampler(split)
  marker = np.arange(len(split), dtype=np.int32) * 7
  batch = next(train_stream.create_train_iterator(split, s, OFF, num_steps=1, camera_class=marker))
  assert set(batch) == {'image', 'label', 'modality', 'camera'}
  np.testing.assert_array_equal(batch['camera'], marker[s.batch_indices(0).index])
  # SYSU-MM01's six cameras, visible first; an unlisted camera falls back by modality.
  assert specs.camera_classes('sysu_mm01') == [(0, 1), (0, 2), (0, 4), (0, 5), (1, 3), (1, 6)]
  got = specs.camera_class_index('sysu_mm01', [0, 0, 1, 1, 0, 1], [1, 5, 3, 6, -1, -1])
  np.testing.assert_array_equal(got, [0, 3, 4, 5, 0, 4])
  assert len(specs.camera_classes('llcm')) == 17
