"""Ranking metrics of cross-modality re-identification: CMC, mAP and mINP.

One vectorised function, `evaluate_ranking`, reproduces the three per-query
loops of the standard code family exactly:

* ``"sysu"``: ``eval_sysu`` of AGW (mangye16/Cross-Modal-Re-ID-baseline,
  ``eval_metrics.py``). For a query from camera 3 every gallery image from
  camera 2 is removed (the two cameras look at the same place); nothing else
  is removed. CMC is computed over the ranked list of unique gallery
  identities (first occurrence of each identity, after the removal); mAP and
  mINP over the full ranked list after the removal.
* ``"llcm"``: ``eval_llcm`` of DEEN (ZYK100/LLCM). Gallery images of the
  query's own identity taken by the query's own camera are removed; CMC over
  unique identities as in ``"sysu"``.
* ``"regdb"``: ``eval_regdb`` of AGW. Nothing is removed; CMC is the standard
  one over the full ranked list.

In every protocol a query whose identity has no remaining gallery image is
skipped (left out of every mean). The work is done in chunks of queries sized
from a memory budget, so galleries of 100,000+ images fit. The distances may
be given as `NegativeProducts`, the negative dot products of query and gallery
features computed one chunk of queries at a time: then the [Q, G] matrix is
never held whole either.

Ties: the reference code ranks with ``np.argsort`` (quicksort, not stable), so
the order of equal distances there depends on the numpy build. Here the
ranking is that of ``np.argsort(..., kind="stable")``: equal distances keep
gallery order.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

PROTOCOLS = ('sysu', 'regdb', 'llcm')

# Bytes of working memory per (query, gallery) element of a chunk: the
# distances with the removed ones at +inf (8) and sorted (8), and a few
# boolean masks; the rows scored by the full ranking (ties) add the argsort
# indices (8), the ranked identities (4) and a kept-rank cumsum (4). Measured
# with tracemalloc at 20-25; 32 keeps the peak under the budget.
_BYTES_PER_ELEMENT = 32
DEFAULT_MEMORY_BUDGET = 256 * 2**20


class NegativeProducts:
  """Distances -<f_q, f_g> of query and gallery features, computed by blocks of queries.

  `evaluate_ranking` takes it in place of a [Q, G] matrix and asks for one
  chunk of rows at a time, so only a chunk's distances exist at once.
  `seconds` accumulates the time spent in the products.
  """

  def __init__(self, query: np.ndarray, gallery: np.ndarray):
    self.query = np.asarray(query, np.float32)
    self.gallery = np.asarray(gallery, np.float32)
    if (
      self.query.ndim != 2 or self.gallery.ndim != 2 or self.query.shape[1] != self.gallery.shape[1]
    ):
      raise ValueError(
        f'query and gallery features must be [Q, D] and [G, D], got {self.query.shape} '
        f'and {self.gallery.shape}'
      )
    self.shape = (len(self.query), len(self.gallery))
    self.ndim = 2
    self.seconds = 0.0

  def __getitem__(self, rows: slice) -> np.ndarray:
    start = time.perf_counter()
    out = -(self.query[rows] @ self.gallery.T)
    self.seconds += time.perf_counter() - start
    return out


def evaluate_ranking(
  distmat: Any,
  q_pids: Any,
  g_pids: Any,
  q_camids: Any = None,
  g_camids: Any = None,
  protocol: str = 'sysu',
  max_rank: int = 20,
  memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> dict[str, Any]:
  """Scores a query-by-gallery distance matrix (smaller is closer).

  Args:
    distmat: [Q, G] distances (e.g. negative inner products of features), or
      `NegativeProducts`, which computes them chunk by chunk.
    q_pids: [Q] query identities.
    g_pids: [G] gallery identities.
    q_camids: [Q] query cameras; required by "sysu" and "llcm".
    g_camids: [G] gallery cameras; required by "sysu" and "llcm".
    protocol: "sysu", "regdb" or "llcm" (see the module docstring).
    max_rank: length of the CMC curve; clipped to G as the reference does.
    memory_budget: bytes of working memory a chunk of queries may use.

  Returns:
    A dict with ``cmc`` ([min(max_rank, G)] float64, fraction of the valid
    queries whose identity is found within the first k ranks), ``mAP`` and
    ``mINP`` (floats in [0, 1]) and ``num_valid_queries`` (int). Where a
    query's ranked list of unique identities is shorter than ``max_rank``
    (the reference fails there), its curve keeps its last value.

  Raises:
    ValueError: on an unknown protocol, mismatched shapes, missing cameras,
      NaN distances, or when no query has a match in the gallery.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f'protocol must be one of {PROTOCOLS}, got {protocol!r}')
  if not isinstance(distmat, NegativeProducts):
    distmat = np.asarray(distmat)
  if distmat.ndim != 2:
    raise ValueError(f'distmat must be 2-D, got shape {distmat.shape}')
  num_q, num_g = distmat.shape
  q_pids = _vector(q_pids, num_q, 'q_pids')
  g_pids = _vector(g_pids, num_g, 'g_pids')
  if protocol == 'regdb':
    q_camids = np.zeros(num_q, np.int64)
    g_camids = np.zeros(num_g, np.int64)
  else:
    if q_camids is None or g_camids is None:
      raise ValueError(f'protocol {protocol!r} needs q_camids and g_camids')
    q_camids = _vector(q_camids, num_q, 'q_camids')
    g_camids = _vector(g_camids, num_g, 'g_camids')
  if num_q == 0 or num_g == 0:
    raise ValueError(f'empty query or gallery: distmat shape {distmat.shape}')
  if max_rank < 1:
    raise ValueError(f'max_rank must be positive, got {max_rank}')
  if num_g < max_rank:
    warnings.warn(
      f'gallery of {num_g} images is smaller than max_rank '
      f'{max_rank}; the CMC curve is cut to {num_g} ranks',
      stacklevel=2,
    )
    max_rank = num_g

  # Identities as dense integers 0..U-1; a query identity absent from the
  # gallery gets -1 and can never match.
  g_ids, g_dense = np.unique(g_pids, return_inverse=True)
  g_dense = g_dense.astype(np.int32)
  pos = np.searchsorted(g_ids, q_pids).clip(0, len(g_ids) - 1)
  q_dense = np.where(g_ids[pos] == q_pids, pos, -1).astype(np.int32)

  chunk = max(1, memory_budget // (_BYTES_PER_ELEMENT * num_g))
  rank_counts = np.zeros(max_rank, np.int64)
  all_ap, all_inp = [], []
  for start in range(0, num_q, chunk):
    sl = slice(start, min(start + chunk, num_q))
    d = distmat[sl]
    if np.isnan(d).any():
      raise ValueError('distmat contains NaN')
    ranks, ap, inp = _score_chunk(
      d, q_dense[sl], q_camids[sl], g_dense, g_camids, protocol, len(g_ids)
    )
    rank_counts += np.bincount(np.minimum(ranks, max_rank + 1) - 1, minlength=max_rank + 1)[
      :max_rank
    ]
    all_ap.append(ap)
    all_inp.append(inp)

  all_ap = np.concatenate(all_ap)
  num_valid = len(all_ap)
  if num_valid == 0:
    raise ValueError(
      f'no query identity has a match in the gallery (protocol {protocol!r}): nothing to evaluate'
    )
  return {
    'cmc': np.cumsum(rank_counts) / num_valid,
    'mAP': float(np.mean(all_ap)),
    'mINP': float(np.mean(np.concatenate(all_inp))),
    'num_valid_queries': int(num_valid),
  }


def _vector(x: Any, n: int, name: str) -> np.ndarray:
  x = np.asarray(x).reshape(-1)
  if x.shape != (n,):
    raise ValueError(f'{name} must have {n} entries, got {x.shape[0]}')
  return x


def _rank(d: np.ndarray) -> np.ndarray:
  """Gallery indices of each row in ascending distance, ties in index order.

  Equivalent to ``np.argsort(d, axis=1, kind="stable")``. A row whose
  distances are all distinct has a single ascending order, which the faster
  default sort finds too; only rows holding a tie are sorted again, stably.
  """
  order = np.argsort(d, axis=1)
  ranked = np.take_along_axis(d, order, axis=1)
  tied = (ranked[:, 1:] == ranked[:, :-1]).any(axis=1)
  del ranked
  if tied.any():
    order[tied] = np.argsort(d[tied], axis=1, kind='stable')
  return order


def removed_from_gallery(
  protocol: str, q_pids: np.ndarray, q_cams: np.ndarray, g_pids: np.ndarray, g_cams: np.ndarray
) -> np.ndarray | None:
  """Which gallery images a protocol removes for each query (module doc).

  Args:
    protocol: "sysu", "regdb" or "llcm".
    q_pids, q_cams: [Q] query identities and cameras.
    g_pids, g_cams: [G] gallery identities and cameras.

  Returns:
    [Q, G] bool, True where gallery image g does not count for query q, in
    gallery order; None when the protocol removes nothing ("regdb").
  """
  if protocol == 'sysu':
    return (np.asarray(q_cams) == 3)[:, None] & (np.asarray(g_cams) == 2)[None, :]
  if protocol == 'llcm':
    return (np.asarray(g_pids)[None, :] == np.asarray(q_pids)[:, None]) & (
      np.asarray(g_cams)[None, :] == np.asarray(q_cams)[:, None]
    )
  return None


def _score_chunk(
  d: np.ndarray,
  q_dense: np.ndarray,
  q_cam: np.ndarray,
  g_dense: np.ndarray,
  g_cam: np.ndarray,
  protocol: str,
  num_ids: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Scores one chunk of queries from each row's sorted distances, without an argsort.

  A correct match's rank after the removal is one plus the number of kept
  images closer than it: each row's kept distances are sorted (removed ones as
  +inf) and every correct match's distance is located by a binary search. The
  query identity's place in the list of unique identities is one plus the
  number of other identities with a kept image closer than the first correct
  match. Both equal the stable ranking's wherever no kept or removed distance
  equals a correct match's; the rows where one does (ties, or a correct match
  at +inf) are scored by `_score_chunk_ranked`, the full stable argsort.

  Args and returns: as `_score_chunk_ranked`.
  """
  num_c, num_g = d.shape
  removed = removed_from_gallery(protocol, q_dense, q_cam, g_dense, g_cam)
  kept_d = d if removed is None else np.where(removed, np.inf, d).astype(d.dtype, copy=False)
  rows, cols = _correct_matches(q_dense, g_dense, num_ids)
  if removed is not None:
    kept = ~removed[rows, cols]
    rows, cols = rows[kept], cols[kept]
  value = kept_d[rows, cols] + 0  # + 0 makes -0.0 equal 0.0 for the comparisons, as the sort's
  ordered = np.sort(kept_d, axis=1)
  closer = _count_closer(ordered, rows, value)
  # ordered[row, closer] is the match itself; a tie is an equal distance just after it.
  after = ordered[rows, np.minimum(closer + 1, num_g - 1)]
  tied = ((after == value) & (closer + 1 < num_g)) | np.isposinf(value)
  del ordered

  tied_row = np.zeros(num_c, bool)
  tied_row[rows[tied]] = True
  # Within a row, the matches in rank order; without ties their ranks are distinct.
  kept_rank = closer + 1
  by_rank = np.lexsort((kept_rank, rows))
  rows, kept_rank, value = rows[by_rank], kept_rank[by_rank], value[by_rank]
  starts, valid, ap_valid, inp_valid = _average_precision(rows, kept_rank, num_c)
  ap = np.zeros(num_c)
  inp = np.zeros(num_c)
  first_rank = np.zeros(num_c, np.int64)
  if valid.any():
    ap[valid], inp[valid] = ap_valid, inp_valid
    if protocol == 'regdb':
      first_rank[valid] = kept_rank[starts[valid]]
    else:
      nearest = np.full(num_c, -np.inf, kept_d.dtype)
      nearest[valid] = value[starts[valid]]
      first_rank[valid] = _identities_closer(kept_d, nearest, g_dense, num_ids)[valid] + 1

  if tied_row.any():
    exact = _score_chunk_ranked(
      d[tied_row], q_dense[tied_row], q_cam[tied_row], g_dense, g_cam, protocol, num_ids
    )
    redo = tied_row & valid  # the exact path returns its valid rows, in order
    first_rank[redo], ap[redo], inp[redo] = exact
  return first_rank[valid], ap[valid], inp[valid]


def _correct_matches(
  q_dense: np.ndarray, g_dense: np.ndarray, num_ids: int
) -> tuple[np.ndarray, np.ndarray]:
  """(row, gallery column) of every image of each query's identity, rows ascending.

  From the gallery grouped by identity, in O(number of matches) rather than a
  [C, G] comparison; a query identity absent from the gallery (-1) has none.
  """
  by_identity = np.argsort(g_dense, kind='stable')
  count = np.bincount(g_dense, minlength=num_ids)
  start = np.cumsum(count) - count
  present = q_dense >= 0
  per_row = np.where(present, count[np.maximum(q_dense, 0)], 0)
  rows = np.repeat(np.arange(len(q_dense)), per_row)
  offset = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
  cols = by_identity[start[np.maximum(q_dense, 0)][rows] + offset]
  return rows, cols


def _count_closer(ordered: np.ndarray, rows: np.ndarray, value: np.ndarray) -> np.ndarray:
  """Per (row, value) pair, how many of the sorted ordered[row] are < value.

  A binary search over each row, vectorised over the pairs (numpy's
  searchsorted takes one row at a time).
  """
  num_g = ordered.shape[1]
  low = np.zeros(len(rows), np.int64)
  high = np.full(len(rows), num_g, np.int64)
  for _ in range(int(num_g).bit_length()):
    open_ = low < high
    mid = (low + high) // 2
    go_right = open_ & (ordered[rows, np.minimum(mid, num_g - 1)] < value)
    low = np.where(go_right, mid + 1, low)
    high = np.where(open_ & ~go_right, mid, high)
  return low


def _identities_closer(
  kept_d: np.ndarray, nearest: np.ndarray, g_dense: np.ndarray, num_ids: int
) -> np.ndarray:
  """Per row, the distinct identities with a kept image closer than `nearest[row]`."""
  rows, cols = np.nonzero(kept_d < nearest[:, None])
  seen = np.zeros((len(kept_d), num_ids), dtype=bool)
  seen[rows, g_dense[cols]] = True
  return seen.sum(axis=1)


def _score_chunk_ranked(
  d: np.ndarray,
  q_dense: np.ndarray,
  q_cam: np.ndarray,
  g_dense: np.ndarray,
  g_cam: np.ndarray,
  protocol: str,
  num_ids: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Scores one chunk of queries from the full stable ranking of each row.

  Args:
    d: [C, G] distances.
    q_dense, q_cam: [C] dense query identities (-1: not in gallery), cameras.
    g_dense, g_cam: [G] dense gallery identities and cameras.
    protocol: which images are removed and which CMC is used.
    num_ids: U, the number of gallery identities.

  Returns:
    For the valid queries of the chunk, in order: the rank (1-based) of the
    first correct match on the curve the protocol uses, AP and INP.
  """
  num_c, num_g = d.shape
  order = _rank(d)
  ranked_ids = g_dense[order]
  match = ranked_ids == q_dense[:, None]
  removed = removed_from_gallery(protocol, q_dense, q_cam, g_dense, g_cam)
  if removed is not None:
    removed = np.take_along_axis(removed, order, axis=1)
  del order

  if removed is not None:
    match &= ~removed
  rows, cols = np.nonzero(match)  # row-major: ascending rank within a row
  del match
  if removed is not None:
    dropped_before = np.cumsum(removed, axis=1, dtype=np.int32)[rows, cols]
    kept_rank = cols + 1 - dropped_before
  else:
    kept_rank = cols + 1
  starts, valid, ap, inp = _average_precision(rows, kept_rank, num_c)

  if protocol == 'regdb':
    first_rank = kept_rank[starts[valid]]
  else:
    first_col = np.full(num_c, num_g)
    first_col[valid] = cols[starts[valid]]
    first_rank = _unique_identity_rank(ranked_ids, removed, first_col, num_ids)[valid]
  return first_rank, ap, inp


def _average_precision(
  rows: np.ndarray, kept_rank: np.ndarray, num_c: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """AP and INP from every correct match's rank after the removal.

  Args:
    rows: the query row of each correct match, ascending, and within a row the
      matches in rank order.
    kept_rank: each match's 1-based rank among the kept gallery images.
    num_c: the number of query rows.

  Returns:
    starts ([C], where each row's matches begin), valid ([C], rows with a
    correct match), and AP and INP of the valid rows, in order.
  """
  num_rel = np.bincount(rows, minlength=num_c)
  valid = num_rel > 0
  ends = np.cumsum(num_rel)
  starts = ends - num_rel
  # The j-th correct match of a query (1-based) has precision j / rank.
  hit_no = np.arange(len(rows)) - starts[rows] + 1
  precision = hit_no / kept_rank
  if valid.any():
    ap = np.add.reduceat(precision, starts[valid]) / num_rel[valid]
  else:
    ap = np.zeros(0)
  inp = num_rel[valid] / kept_rank[ends[valid] - 1]
  return starts, valid, ap, inp


def _unique_identity_rank(
  ranked_ids: np.ndarray,
  removed: np.ndarray,
  first_col: np.ndarray,
  num_ids: int,
) -> np.ndarray:
  """Rank of the query identity in the ranked list of unique identities.

  The list is the gallery identities in rank order, each kept at its first
  occurrence after the removal (``np.unique(..., return_index=True)`` then
  sorted indices, in the reference). The query identity first occurs at its
  first kept match, so its rank there is one plus the number of distinct
  identities among the kept images ranked before that match.

  Args:
    ranked_ids: [C, G] dense gallery identities in rank order.
    removed: [C, G] in rank order, True where an image is removed.
    first_col: [C] column of the first kept correct match.
    num_ids: U, the number of gallery identities.

  Returns:
    [C] ranks (1-based); meaningless where a query has no kept match.
  """
  num_c, num_g = ranked_ids.shape
  ahead = np.arange(num_g) < first_col[:, None]
  ahead &= ~removed
  rows, cols = np.nonzero(ahead)
  seen = np.zeros((num_c, num_ids), dtype=bool)
  seen[rows, ranked_ids[rows, cols]] = True
  return seen.sum(axis=1) + 1
