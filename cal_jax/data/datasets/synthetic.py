"""Writes small synthetic VI-ReID data sets in the layouts their owners use.

  python -m cal_jax.data.datasets.synthetic --layout sysu|regdb|llcm --output DIR \
      [--num-ids 96] [--seed 0]

The tree under DIR has the real folder names, index files and file formats
(SYSU-MM01: cam1..cam6 JPEGs and exp/*_id.txt; RegDB: Visible/ and Thermal/
BMPs and idx/ files of 10 trials; LLCM: vis/, nir/, test_vis/, test_nir/ JPEGs
and idx/), so the tfds builders and `records.list_records` read it as they read
the real data sets. People and cameras come from `synthetic_people`; see
docs/data.md for what makes the identities learnable but not trivially.

Everything is drawn from numpy generators keyed by (seed, layout, purpose,
identity, camera, image), so a seed gives byte-identical trees. Images are
about 128 x 64 (height x width, varying per image for SYSU-MM01 and LLCM as in
the real sets; RegDB's are all 128 x 64 like the real ones), smaller than the
real SYSU-MM01 and LLCM crops so that the default set is written in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cal_jax.data.datasets import synthetic_people as people

DEFAULT_NUM_IDS = 96  # SYSU-MM01 / LLCM: 64 train + 32 test; RegDB: 48 + 48
DEFAULT_HEIGHT = 128
DEFAULT_IMAGES_PER_CAMERA = (3, 6)  # inclusive; RegDB always has 10 + 10
REGDB_IMAGES = 10
LOOK_ALIKE_FRACTION = 0.25
_LAYOUT_KEY = {'sysu': 1, 'regdb': 2, 'llcm': 3}


@dataclasses.dataclass(frozen=True)
class Summary:
  """What `generate` wrote."""

  layout: str
  root: str
  num_images: int
  train_ids: tuple  # for RegDB: trial 1
  test_ids: tuple


def _rng(*keys: int) -> np.random.Generator:
  return np.random.default_rng([int(k) for k in keys])


def _identities(rng: np.random.Generator, ids: Sequence[int]) -> dict:
  """Appearances of `ids`; a quarter copy an earlier one but 1-2 colours."""
  apps = {}
  for n, pid in enumerate(ids):
    if n and rng.random() < LOOK_ALIKE_FRACTION:
      apps[pid] = people.look_alike(apps[ids[rng.integers(n)]], rng)
    else:
      apps[pid] = people.sample_appearance(rng)
  return apps


def _size(rng: np.random.Generator, height: int) -> tuple:
  h = round(height * rng.uniform(0.85, 1.2))
  return h, round(h * rng.uniform(0.42, 0.55))


def _save(image: np.ndarray, path: str, fmt: str, quality: int = 90) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pil = Image.fromarray(image)
  if fmt == 'JPEG':
    pil.save(path, format='JPEG', quality=quality)
  else:
    pil.save(path, format=fmt)


def _write_text(root: str, rel: str, lines: Sequence[str]) -> None:
  os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
  with open(os.path.join(root, rel), 'w', encoding='utf-8', newline='\n') as f:
    f.write('\n'.join(lines) + '\n')


def _write_sysu(
  root: str,
  num_ids: int,
  seed: int,
  per_camera: tuple,
  height: int,
  infrared_gap: float = 1.0,
  num_test_ids: int = 0,
  misalignment: bool = False,
) -> Summary:
  """SYSU-MM01: cam<c>/<id:04d>/<n:04d>.jpg, exp/{train,val,test}_id.txt."""
  key = _LAYOUT_KEY['sysu']
  rng = _rng(seed, key, 0)
  # Ids with gaps, as in the real set (491 ids numbered up to 533).
  ids = sorted(
    int(i) for i in rng.choice(np.arange(1, math.ceil(num_ids * 1.1) + 1), num_ids, replace=False)
  )
  perm = [int(i) for i in rng.permutation(ids)]
  n_test = num_test_ids or num_ids // 3
  n_val = (num_ids - n_test) // 4
  test, val = sorted(perm[:n_test]), sorted(perm[n_test : n_test + n_val])
  train = sorted(perm[n_test + n_val :])
  for name, split in (('train', train), ('val', val), ('test', test)):
    _write_text(root, f'exp/{name}_id.txt', [','.join(map(str, split))])
  apps = _identities(rng, ids)
  cams = {
    c: dataclasses.replace(
      people.sample_camera(_rng(seed, key, 1, c), 'nir' if c in (3, 6) else 'visible'),
      infrared_gap=infrared_gap,
      misalignment=misalignment,
    )
    for c in range(1, 7)
  }
  # Indoor (cam1-3) and outdoor (cam4-6) visits; not every camera sees everyone.
  seen = {}
  for pid in ids:
    r = _rng(seed, key, 2, pid)
    indoor = r.random() < 0.7
    outdoor = r.random() < 0.8 or not indoor
    visits = [c for c in range(1, 7) if (indoor if c <= 3 else outdoor) and r.random() < 0.8]
    if not {3, 6} & set(visits):
      visits.append(3 if indoor else 6)
    if not {1, 2, 4, 5} & set(visits):
      visits.append(1 if indoor else 4)
    seen[pid] = sorted(visits)
  for c in range(1, 7):  # every camera folder holds someone
    if not any(c in v for v in seen.values()):
      seen[ids[c % len(ids)]] = sorted(seen[ids[c % len(ids)]] + [c])
  count = 0
  for pid in ids:
    for c in seen[pid]:
      r = _rng(seed, key, 3, pid, c)
      for n in range(1, int(r.integers(per_camera[0], per_camera[1] + 1)) + 1):
        image = people.render(apps[pid], cams[c], r, _size(r, height))
        rel = f'cam{c}/{pid:04d}/{n:04d}.jpg'
        _save(image, os.path.join(root, rel), 'JPEG', cams[c].quality)
        count += 1
  return Summary('sysu', root, count, tuple(train + val), tuple(test))


def _write_regdb(
  root: str, num_ids: int, seed: int, height: int, misalignment: bool = False
) -> Summary:
  """RegDB: {Visible,Thermal}/<id>/<sex>_<view>_{v,t}_<frame>_<id>.bmp, idx/."""
  key = _LAYOUT_KEY['regdb']
  rng = _rng(seed, key, 0)
  ids = list(range(1, num_ids + 1))
  apps = _identities(rng, ids)
  sensors = tuple(
    (folder, letter, dataclasses.replace(camera, misalignment=misalignment))
    for folder, letter, camera in (
      ('Visible', 'v', people.sample_camera(_rng(seed, key, 1, 1), 'visible')),
      ('Thermal', 't', people.sample_camera(_rng(seed, key, 1, 2), 'thermal')),
    )
  )
  files = {}
  for pid in ids:
    r = _rng(seed, key, 2, pid)
    sex = 'female' if r.random() < 0.5 else 'male'
    front = bool(r.random() < 0.5)
    view = 'front' if front else 'back'
    first = int(r.integers(0, 90000))
    files[pid] = []
    for k in range(REGDB_IMAGES):
      for folder, letter, cam in sensors:
        # The dual camera takes both images at once: the same pose.
        image = people.render(
          apps[pid],
          cam,
          _rng(seed, key, 3, pid, k, ord(letter)),
          (height, height // 2),
          pose=_rng(seed, key, 4, pid, k),
          front=front,
        )
        frame = first + 3 * k
        rel = f'{folder}/{pid}/{sex}_{view}_{letter}_{frame:05d}_{pid}.bmp'
        _save(image, os.path.join(root, rel), 'BMP')  # 24-bit, as AGW reads
        files[pid].append(rel)
  half = num_ids // 2
  perms = {t: [int(i) for i in _rng(seed, key, 5, t).permutation(ids)] for t in range(1, 11)}
  for trial, perm in perms.items():
    for split, part in (('train', perm[:half]), ('test', perm[half:])):
      for folder, kind in (('Visible', 'visible'), ('Thermal', 'thermal')):
        _write_text(
          root,
          f'idx/{split}_{kind}_{trial}.txt',
          [
            f'{rel} {label}'
            for label, pid in enumerate(part)
            for rel in files[pid]
            if rel.startswith(folder)
          ],
        )
  return Summary(
    'regdb',
    root,
    2 * REGDB_IMAGES * num_ids,
    tuple(sorted(perms[1][:half])),
    tuple(sorted(perms[1][half:])),
  )


def _write_llcm(
  root: str,
  num_ids: int,
  seed: int,
  per_camera: tuple,
  height: int,
  misalignment: bool = False,
) -> Summary:
  """LLCM: {vis,nir}/<id:04d>/<id:04d>_c<cam:02d>_s<seq>_f<frame>_{vis,nir}.jpg,
  test copies in test_{vis,nir}/cam<c>/<id:04d>/, idx/."""
  key = _LAYOUT_KEY['llcm']
  rng = _rng(seed, key, 0)
  ids = list(range(1, num_ids + 1))
  test = sorted(int(i) for i in rng.choice(ids, num_ids // 3, replace=False))
  test_set = set(test)
  train = sorted(set(ids) - test_set)
  label = {p: n for part in (train, test) for n, p in enumerate(part)}
  apps = _identities(rng, ids)
  cams = {}
  for c in range(1, 10):
    low_light = bool(_rng(seed, key, 1, c, 2).random() < 0.7)
    for m, sensor in ((0, 'visible'), (1, 'nir')):
      camera = people.sample_camera(_rng(seed, key, 1, c, m), sensor, low_light=low_light)
      cams[c, m] = dataclasses.replace(camera, misalignment=misalignment)
  for m, cam_list in (('vis', range(1, 10)), ('nir', (1, 2, 4, 5, 6, 7, 8, 9))):
    for c in cam_list:  # as distributed, every test camera folder exists
      os.makedirs(os.path.join(root, f'test_{m}', f'cam{c}'), exist_ok=True)
  lines = {'train_vis': [], 'train_nir': [], 'test_vis': [], 'test_nir': []}
  count = 0
  for pid in ids:
    r = _rng(seed, key, 2, pid)
    visits = sorted(int(c) + 1 for c in r.choice(9, int(r.integers(2, 5)), replace=False))
    counts = {
      (c, m): 0 if (m and c == 3) else int(r.integers(0, per_camera[1] + 1))
      for c in visits
      for m in (0, 1)
    }
    for m in (0, 1):  # at least a few images of each modality
      if not any(counts[c, m] for c in visits):
        counts[next(c for c in visits if not (m and c == 3)), m] = per_camera[0]
    split = 'test' if pid in test_set else 'train'
    for (c, m), n_images in sorted(counts.items()):
      name = ('vis', 'nir')[m]
      hhmmss = int(r.integers(17, 22)) * 10000 + int(r.integers(60)) * 100 + int(r.integers(60))
      first = int(r.integers(1, 9000))
      for k in range(n_images):
        image = people.render(
          apps[pid], cams[c, m], _rng(seed, key, 3, pid, c, m, k), _size(r, height)
        )
        base = f'{pid:04d}_c{c:02d}_s{hhmmss:06d}_f{first + 7 * k}_{name}.jpg'
        rel = f'{name}/{pid:04d}/{base}'
        _save(image, os.path.join(root, rel), 'JPEG', cams[c, m].quality)
        count += 1
        if split == 'test':  # test camera folders hold byte-identical copies
          copy = f'test_{name}/cam{c}/{pid:04d}/{base}'
          os.makedirs(os.path.dirname(os.path.join(root, copy)), exist_ok=True)
          shutil.copyfile(os.path.join(root, rel), os.path.join(root, copy))
          rel = copy
        lines[f'{split}_{name}'].append(f'{rel} {label[pid]}')
  for name, idx_lines in lines.items():
    _write_text(root, f'idx/{name}.txt', idx_lines)
  _write_text(root, 'idx/test_id.txt', [','.join(map(str, test))])
  return Summary('llcm', root, count, tuple(train), tuple(test))


def generate(
  layout: str,
  output: str,
  num_ids: int = DEFAULT_NUM_IDS,
  seed: int = 0,
  *,
  images_per_camera: tuple = DEFAULT_IMAGES_PER_CAMERA,
  height: int = DEFAULT_HEIGHT,
  infrared_gap: float = 1.0,
  num_test_ids: int = 0,
  misalignment: bool = False,
) -> Summary:
  """Writes a synthetic `layout` ('sysu' | 'regdb' | 'llcm') data set.

  Args:
    layout: which data set's layout to write.
    output: the data set root to create; must be absent or empty.
    num_ids: identities; a third (SYSU-MM01, LLCM) or half (RegDB) are test.
    seed: the same seed writes a byte-identical tree.
    images_per_camera: (min, max) images per identity and camera (SYSU-MM01,
      LLCM); RegDB has 10 visible and 10 thermal per identity, as the real one.
    height: typical image height in pixels; widths are about half.
    infrared_gap: SYSU-MM01 layout only: 1 (default) renders each material's
      own near-infrared reflectance; 0 renders the colour's luminance, an easy
      cross-modal gap for quick demonstrations; values in between mix the two.
    num_test_ids: SYSU-MM01 layout only: how many of the `num_ids` are test
      identities (0, the default: a third, as the real set's 96 of 491). The
      rest train (a quarter of them listed as validation, merged into training
      as the standard protocol does).
    misalignment: False (default): each person stands near the middle at about
      the same size; True: drawn as a detector's box frames people (a random
      scale, vertical crop and horizontal offset, with occluders); every layout.

  Returns:
    A `Summary` of what was written.
  """
  if layout not in _LAYOUT_KEY:
    raise ValueError(f'layout must be one of {sorted(_LAYOUT_KEY)}, got {layout!r}')
  if num_ids < 6:
    raise ValueError(f'num_ids must be at least 6, got {num_ids}')
  if not 0.0 <= infrared_gap <= 1.0:
    raise ValueError(f'infrared_gap must be in [0, 1], got {infrared_gap}')
  if infrared_gap != 1.0 and layout != 'sysu':
    raise ValueError('infrared_gap is implemented for the sysu layout only')
  if num_test_ids and layout != 'sysu':
    raise ValueError('num_test_ids is implemented for the sysu layout only')
  if num_test_ids and not 2 <= num_test_ids <= num_ids - 4:
    raise ValueError(
      f'num_test_ids must be in [2, num_ids - 4] = [2, {num_ids - 4}] (the rest train), '
      f'got {num_test_ids}'
    )
  if os.path.isdir(output) and os.listdir(output):
    raise FileExistsError(f'{output!r} is not empty; give a new folder')
  os.makedirs(output, exist_ok=True)
  if layout == 'sysu':
    return _write_sysu(
      output,
      num_ids,
      seed,
      tuple(images_per_camera),
      height,
      infrared_gap,
      num_test_ids,
      misalignment,
    )
  if layout == 'regdb':
    return _write_regdb(output, num_ids, seed, height, misalignment)
  return _write_llcm(output, num_ids, seed, tuple(images_per_camera), height, misalignment)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--layout', required=True, choices=sorted(_LAYOUT_KEY))
  parser.add_argument('--output', required=True, help='data set root to create')
  parser.add_argument('--num-ids', type=int, default=DEFAULT_NUM_IDS)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
    '--min-images',
    type=int,
    default=DEFAULT_IMAGES_PER_CAMERA[0],
    help='per identity and camera (not RegDB)',
  )
  parser.add_argument('--max-images', type=int, default=DEFAULT_IMAGES_PER_CAMERA[1])
  parser.add_argument('--height', type=int, default=DEFAULT_HEIGHT)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  summary = generate(
    args.layout,
    args.output,
    args.num_ids,
    args.seed,
    images_per_camera=(args.min_images, args.max_images),
    height=args.height,
  )
  print(
    f'{summary.layout}: {summary.num_images} images of '
    f'{len(summary.train_ids)} train + {len(summary.test_ids)} test ids '
    f'in {summary.root} ({time.perf_counter() - start:.1f} s)'
  )


if __name__ == '__main__':
  main()
