"""k-reciprocal re-ranking: time and peak memory at SYSU-MM01's sizes, and the ratio
against the reference loops (tests/reference_rerank.py) at a size they finish in.

  python benchmarks/bench_rerank.py

SYSU-MM01 all-search: 3,803 infrared probes against 301 visible images a trial
(single-shot) or 3,010 (multi-shot, 10 an identity and camera).
"""

import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
from reference_rerank import reference_rerank  # noqa: E402

from cal_jax.evaluation import rerank as rerank_lib  # noqa: E402


def features(rng, n, ids=395, dim=256):
  centres = rng.normal(size=(ids, dim))
  x = centres[rng.integers(0, ids, n)] + 0.8 * rng.normal(size=(n, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def blocks(rng, num_q, num_g):
  q, g = features(rng, num_q), features(rng, num_g)
  return [rerank_lib.euclidean(a, b) for a, b in ((q, g), (q, q), (g, g))]


def main():
  rng = np.random.default_rng(0)
  small = blocks(rng, 400, 200)
  start = time.perf_counter()
  want = reference_rerank(*small)
  t_ref = time.perf_counter() - start
  start = time.perf_counter()
  got = rerank_lib.rerank(*small)
  t_ours = time.perf_counter() - start
  print(
    f'400 x 200: reference loops {t_ref:.2f} s, vectorised {t_ours:.3f} s '
    f'({t_ref / t_ours:.0f}x), max |difference| {np.abs(got - want).max():.1e}'
  )
  for name, num_g in (('single-shot', 301), ('multi-shot', 3010)):
    dists = blocks(rng, 3803, num_g)
    start = time.perf_counter()
    rerank_lib.rerank(*dists)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
      f'SYSU all-search {name}: 3803 x {num_g} in {elapsed:.2f} s a trial '
      f'(peak RSS so far {peak:.0f} MB)'
    )


if __name__ == '__main__':
  main()
