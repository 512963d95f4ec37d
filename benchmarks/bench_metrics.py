"""Times `evaluate_ranking` against the per-query loop on SYSU-MM01 shapes.

Run from the repository root:

  python benchmarks/bench_metrics.py            # about a minute, mostly loop
  python benchmarks/bench_metrics.py --trials 2 --skip_loop --skip_memory

Prints, for the single-shot (301 images) and multi-shot (3,010 images)
all-search galleries against the 3,803 infrared queries, the evaluation time
of 10 trials for both implementations and their ratio, then the peak memory
that `evaluate_ranking` allocates for a 100,000-image gallery against SYSU's
3,803 probes, with the distances by probe chunks (`NegativeProducts`, the
evaluator's path for a gallery this size) and as a whole matrix. Features are
random (identity centre plus noise, 2,048-d, L2-normalised) so that the
metrics are in a realistic range; the distance matrix (float32, as the
evaluator's) is built outside the timed region. Beside the vectorised path
(sorted rows and a binary search per correct match) it times the earlier one
(a stable argsort of every row) on the same matrices, and checks that the two
give the same metrics. No assertions on time: figures only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'tests'))
from reference_eval import loop_eval

from cal_jax.evaluation import metrics
from cal_jax.evaluation.metrics import NegativeProducts, evaluate_ranking

NUM_QUERIES = 3803
NUM_IDS = 96
NUM_GROUPS = 301  # (identity, camera) pairs of the all-search gallery
GALLERY_CAMERAS = (1, 2, 4, 5)
# Per-dimension noise around the identity centre: about 0.6 mAP at 2,048-d.
NOISE = 4.0


def _features(rng, pids, centres, noise):
  f = centres[pids] + noise * rng.standard_normal((len(pids), centres.shape[1]), dtype=np.float32)
  return f / np.linalg.norm(f, axis=1, keepdims=True)


def _sysu_like(rng, dim, shots):
  """Query and gallery identities, cameras and features of SYSU's size."""
  centres = rng.standard_normal((NUM_IDS, dim), dtype=np.float32)
  pairs = [(p, c) for p in range(NUM_IDS) for c in GALLERY_CAMERAS]
  chosen = rng.choice(len(pairs), NUM_GROUPS, replace=False)
  g_pids = np.repeat([pairs[i][0] for i in chosen], shots)
  g_cams = np.repeat([pairs[i][1] for i in chosen], shots)
  q_pids = rng.integers(0, NUM_IDS, NUM_QUERIES)
  q_cams = rng.choice([3, 6], NUM_QUERIES)
  q_feat = _features(rng, q_pids, centres, NOISE)
  return q_feat, q_pids, q_cams, centres, g_pids, g_cams


def _ranked_everywhere(*args, **kwargs):
  """evaluate_ranking with every row scored by the full stable argsort (the earlier path)."""
  sorted_path = metrics._score_chunk
  metrics._score_chunk = metrics._score_chunk_ranked
  try:
    return evaluate_ranking(*args, **kwargs)
  finally:
    metrics._score_chunk = sorted_path


def bench_sysu(trials: int, dim: int, skip_loop: bool) -> None:
  rng = np.random.default_rng(0)
  for shots, name in ((1, 'single-shot'), (10, 'multi-shot')):
    q_feat, q_pids, q_cams, centres, g_pids, g_cams = _sysu_like(rng, dim, shots)
    fast_s = ranked_s = loop_s = 0.0
    fast_map, loop_map = [], []
    for _ in range(trials):
      g_feat = _features(rng, g_pids, centres, NOISE)
      distmat = -(q_feat @ g_feat.T)  # float32, as the evaluator ranks (and the reference)
      t0 = time.perf_counter()
      result = evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams)
      fast_s += time.perf_counter() - t0
      fast_map.append(result['mAP'])
      t0 = time.perf_counter()
      ranked = _ranked_everywhere(distmat, q_pids, g_pids, q_cams, g_cams)
      ranked_s += time.perf_counter() - t0
      assert ranked['mAP'] == result['mAP'] and (ranked['cmc'] == result['cmc']).all()
      if not skip_loop:
        t0 = time.perf_counter()
        _, ap, _ = loop_eval(distmat, q_pids, g_pids, q_cams, g_cams)
        loop_s += time.perf_counter() - t0
        loop_map.append(ap)
    print(f'SYSU all-search {name}: {NUM_QUERIES} queries x {len(g_pids)} gallery, {trials} trials')
    print(f'  vectorised, sorted rows      {fast_s:8.2f} s   mean mAP {np.mean(fast_map):.4f}')
    print(
      f'  vectorised, argsort (before) {ranked_s:8.2f} s   same metrics; '
      f'sorted rows {ranked_s / fast_s:.1f}x faster'
    )
    if not skip_loop:
      print(f'  loop                         {loop_s:8.2f} s   mean mAP {np.mean(loop_map):.4f}')
      print(
        f'  speed-up over the loop       {loop_s / fast_s:8.1f} x   max |mAP diff| '
        f'{np.max(np.abs(np.subtract(fast_map, loop_map))):.1e}'
      )


def bench_memory(num_gallery: int, num_queries: int, dim: int) -> None:
  rng = np.random.default_rng(1)
  num_ids = num_gallery // 20
  centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
  g_pids = rng.integers(0, num_ids, num_gallery)
  g_cams = rng.choice(GALLERY_CAMERAS, num_gallery)
  q_pids = rng.integers(0, num_ids, num_queries)
  q_cams = rng.choice([3, 6], num_queries)
  # Less noise at this short dimension, for a non-trivial ranking.
  q_features = _features(rng, q_pids, centres, 1.0)
  g_features = _features(rng, g_pids, centres, 1.0)
  # The evaluator's path beyond its union budget: distances by probe chunks, never whole.
  tracemalloc.start()
  t0 = time.perf_counter()
  products = NegativeProducts(q_features, g_features)
  chunked = evaluate_ranking(products, q_pids, g_pids, q_cams, g_cams)
  seconds = time.perf_counter() - t0
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  features_mib = (q_features.nbytes + g_features.nbytes) / 2**20
  print(
    f'Memory: {num_queries} queries x {num_gallery} gallery, {dim}-d features '
    f'({features_mib:.0f} MiB, not counted)'
  )
  print(
    f'  by probe chunks (NegativeProducts): peak allocated {peak / 2**20:8.1f} MiB, '
    f'{seconds:.2f} s ({products.seconds:.2f} s in the products), mAP {chunked["mAP"]:.4f}'
  )
  distmat = -(q_features @ g_features.T)  # float32
  tracemalloc.start()
  t0 = time.perf_counter()
  result = evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams)
  seconds = time.perf_counter() - t0
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  print(
    f'  whole matrix: peak allocated {peak / 2**20:8.1f} MiB beside the '
    f'{distmat.nbytes / 2**20:.0f} MiB matrix, {seconds:.2f} s, mAP {result["mAP"]:.4f}'
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--trials', type=int, default=10)
  parser.add_argument('--dim', type=int, default=2048)
  parser.add_argument('--skip_loop', action='store_true')
  parser.add_argument('--skip_memory', action='store_true')
  parser.add_argument('--memory_gallery', type=int, default=100_000)
  parser.add_argument('--memory_queries', type=int, default=3803)
  parser.add_argument('--memory_dim', type=int, default=2048)
  args = parser.parse_args()
  bench_sysu(args.trials, args.dim, args.skip_loop)
  if not args.skip_memory:
    bench_memory(args.memory_gallery, args.memory_queries, args.memory_dim)


if __name__ == '__main__':
  main()
