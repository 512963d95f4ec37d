"""Time `python -m cal_jax.search` for a 10,000-image gallery on this machine.

  python benchmarks/bench_search.py --model WORKDIR [--gallery_size 10000]

The gallery and the queries are made from the images below WORKDIR/synthetic_data
(a run of configs/synthetic*.py): visible cameras to the gallery, infrared ones to
the queries, each image also saved mirrored and darkened (distinct files), one
sub-folder per identity. The command runs twice: the first run embeds everything,
the second reads the cache and only ranks.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from PIL import Image, ImageEnhance, ImageOps


def build(source: str, target: str, cams: tuple[str, ...], limit: int) -> int:
  count = 0
  for cam in cams:
    for pid in sorted(os.listdir(os.path.join(source, cam))):
      for name in sorted(os.listdir(os.path.join(source, cam, pid))):
        image = Image.open(os.path.join(source, cam, pid, name)).convert('RGB')
        variants = (
          ('', image),
          ('m', ImageOps.mirror(image)),
          ('d', ImageEnhance.Brightness(image).enhance(0.85)),
        )
        for flip, pixels in variants:
          if count >= limit:
            return count
          folder = os.path.join(target, pid)
          os.makedirs(folder, exist_ok=True)
          pixels.save(os.path.join(folder, f'{cam}_{flip}{name}'), quality=95)
          count += 1
  return count


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--model', required=True)
  parser.add_argument('--gallery_size', type=int, default=10000)
  parser.add_argument('--query_size', type=int, default=1000)
  args = parser.parse_args()
  source = os.path.join(args.model, 'synthetic_data')
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    n_g = build(source, os.path.join(tmp, 'g'), ('cam1', 'cam2', 'cam4', 'cam5'), args.gallery_size)
    n_q = build(source, os.path.join(tmp, 'q'), ('cam3', 'cam6'), args.query_size)
    print(f'{n_q} queries, {n_g} gallery images written in {time.perf_counter() - start:.0f} s')
    command = [
      sys.executable, '-m', 'cal_jax.search', '--model', args.model,
      '--query', os.path.join(tmp, 'q'), '--query_modality', 'infrared',
      '--gallery', os.path.join(tmp, 'g'), '--gallery_modality', 'visible',
      '--output', os.path.join(tmp, 'out'),
    ]  # fmt: skip
    for label in ('first run (embeds)', 'second run (cache)'):
      start = time.perf_counter()
      done = subprocess.run(command, capture_output=True, text=True, check=True)
      wall = time.perf_counter() - start
      line = next(x for x in done.stdout.splitlines() if 'queries against' in x)
      times = re.search(r'in ([\d.]+) s embedding \+ ([\d.]+) s ranking', line)
      print(
        f'{label}: {wall:.0f} s in all; embedding {times[1]} s '
        f'({(n_q + n_g) / max(float(times[1]), 1e-9):.0f} images/s), ranking {times[2]} s'
      )


if __name__ == '__main__':
  main()
