"""Throughput of the training input pipeline on generated SYSU-MM01-sized data.

Generates smooth random person-sized JPEGs in memory (SYSU-MM01's training
split: 395 identities, 22,258 visible and 11,909 infrared images; sizes drawn
from 150..500 pixels high, aspect 2..3), builds the full training pipeline at
288 x 144 with every augmentation on, and prints images/s in total and per
host core. A smaller pool of distinct JPEGs is reused to fill the split (the
decode cost depends on the image, not on its identity). Figures only, no
assertions.

  python benchmarks/bench_input_pipeline.py [--steps 100] [--local_devices 1]
"""

import argparse
import io
import os
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from cal_jax.data import eval_batches, train_stream
from cal_jax.data import sampler as sampler_lib
from cal_jax.data.augment import TrainTransform
from cal_jax.data.images import resize_images
from cal_jax.data.splits import SplitArrays

NUM_IDS, NUM_VISIBLE, NUM_INFRARED = 395, 22258, 11909


def _person_like_jpeg(rng: np.random.Generator) -> bytes:
  """A smooth random image of a person-crop size, JPEG quality 95."""
  height = int(rng.integers(150, 500))
  width = max(16, int(height / rng.uniform(2.0, 3.0)))
  coarse = rng.integers(0, 256, (12, 6, 3), dtype=np.uint8)
  image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
  noise = rng.integers(-12, 13, (height, width, 3))
  noisy = np.asarray(image, np.int16) + noise
  buffer = io.BytesIO()
  Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def _sysu_like_split(unique: int, seed: int = 0) -> SplitArrays:
  rng = np.random.default_rng(seed)
  pool = [_person_like_jpeg(rng) for _ in range(unique)]
  n = NUM_VISIBLE + NUM_INFRARED
  modality = np.repeat([0, 1], [NUM_VISIBLE, NUM_INFRARED])
  ids = np.concatenate([np.arange(NUM_VISIBLE) % NUM_IDS, np.arange(NUM_INFRARED) % NUM_IDS]) + 1
  images = np.array([pool[i % unique] for i in range(n)], dtype=object)
  return SplitArrays(
    image=images,
    id=ids.astype(np.int32),
    camera=np.zeros(n, np.int32),
    modality=modality.astype(np.int32),
    path=np.full(n, '', dtype=object),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--warmup', type=int, default=10)
  parser.add_argument('--unique', type=int, default=1000, help='distinct generated JPEGs')
  parser.add_argument('--local_devices', type=int, default=1)
  parser.add_argument('--num_ids_per_batch', type=int, default=8)
  parser.add_argument('--num_pos', type=int, default=4)
  args = parser.parse_args()

  start = time.perf_counter()
  split = _sysu_like_split(args.unique)
  encoded_mb = sum(len(b) for b in split.image) / 2**20
  print(
    f'generated {len(split)} images ({args.unique} distinct, '
    f'{encoded_mb:.0f} MiB encoded) in {time.perf_counter() - start:.1f} s'
  )

  sampler = sampler_lib.CrossModalIdentitySampler(
    split.id,
    split.modality,
    num_ids_per_batch=args.num_ids_per_batch,
    num_pos=args.num_pos,
    seed=0,
    local_devices=args.local_devices,
  )
  transform = TrainTransform()  # 288 x 144, every augmentation on
  cores = os.cpu_count() or 1
  start = time.perf_counter()
  pixels = resize_images(split.image, transform.image_size)
  elapsed = time.perf_counter() - start
  print(
    f'decode + resize once (PIL, {cores} threads): '
    f'{len(split) / elapsed:.0f} images/s, {elapsed:.1f} s, '
    f'{pixels.nbytes / 2**30:.1f} GiB'
  )
  iterator = train_stream.create_train_iterator(
    split, sampler, transform, pixels=pixels, num_steps=args.warmup + args.steps
  )
  start = time.perf_counter()
  for _ in range(args.warmup):
    next(iterator)
  print(f'first {args.warmup} batches in {time.perf_counter() - start:.1f} s')
  start = time.perf_counter()
  for _ in range(args.steps):
    next(iterator)
  elapsed = time.perf_counter() - start
  images = args.steps * sampler.local_devices * sampler.per_device_batch
  print(
    f'train: {images / elapsed:.0f} images/s, {args.steps / elapsed:.1f} '
    f'steps/s of {images // args.steps} images, {cores} host cores, '
    f'{images / elapsed / cores:.0f} images/s per core'
  )

  indices = np.arange(4096)  # about SYSU-MM01's query + gallery
  start = time.perf_counter()
  dataset = eval_batches.create_eval_dataset(
    split, indices, image_size=transform.image_size, batch_size=128, flip=True
  )
  created = time.perf_counter() - start
  start = time.perf_counter()
  count = sum(int(batch['mask'].sum()) for batch in dataset.as_numpy_iterator())
  elapsed = time.perf_counter() - start
  print(
    f'eval: decode + resize {indices.size / created:.0f} images/s once, '
    f'then {count / elapsed:.0f} images/s per pass (normalise + flip '
    f'copy), {count / elapsed / cores:.0f} per core'
  )
  print(f'tf {tf.__version__}')


if __name__ == '__main__':
  main()
