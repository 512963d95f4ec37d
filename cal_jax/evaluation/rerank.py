"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), vectorised.

The form that torchreid and fast-reid ship (Zhong's code as Houjing Huang
adapted it to take distance matrices): with k1 = 20, k2 = 6, lambda = 0.3,

  d(i, j)   the squared input distance over all N = Q + G images, each row
            divided by its column's maximum (the reference's normalisation);
  R(i, k)   the k-reciprocal neighbours of i: j among i's k + 1 nearest
            with i among j's k + 1 nearest (i itself included);
  R*(i)     R(i, k1), plus R(c, round(k1 / 2)) for every c in R(i, k1) that
            shares more than 2/3 of it with R(i, k1);
  V[i, j]   exp(-d(i, j)) over j in R*(i), normalised to sum 1, then averaged
            over i's k2 nearest (query expansion);
  d_J(q, g) 1 - sum_k min(V[q,k], V[g,k]) / (2 - sum_k min(V[q,k], V[g,k]));
  final     (1 - lambda) d_J + lambda d.

The reference runs three Python loops over all N images. Here the neighbour
sets are sparse boolean matrices (R = F * F^T, the expansion one sparse
product), V is sparse (about k1 * k2 non-zeros a row), and the Jaccard sums
are taken over probe chunks by joining V's non-zeros on their column, so the
memory beyond the [N, N] input distances is O(nnz(V) + chunk * G).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp


@dataclasses.dataclass(frozen=True)
class RerankSettings:
  """k1, k2 and lambda of the re-ranking (the paper's values by default)."""

  k1: int = 20
  k2: int = 6
  lambda_value: float = 0.3

  def __post_init__(self):
    if self.k1 < 1 or self.k2 < 1:
      raise ValueError(f'rerank k1 and k2 must be positive, got k1={self.k1}, k2={self.k2}')
    if not 0.0 <= self.lambda_value <= 1.0:
      raise ValueError(f'rerank lambda must lie in [0, 1], got {self.lambda_value}')

  def describe(self) -> str:
    return f'k-reciprocal (k1={self.k1}, k2={self.k2}, lambda={self.lambda_value:g})'


def euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[A, B] Euclidean distances between the rows of a [A, D] and b [B, D]."""
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
  return np.sqrt(np.maximum(sq, 0.0))


def rerank(
  q_g: np.ndarray,
  q_q: np.ndarray,
  g_g: np.ndarray,
  settings: RerankSettings = RerankSettings(),
  *,
  chunk: int = 512,
) -> np.ndarray:
  """Re-ranked [Q, G] distances from the query-gallery, query-query and
  gallery-gallery distances (module docstring; smaller is closer)."""
  q_g = np.asarray(q_g, np.float32)
  num_q, num_g = q_g.shape
  if np.shape(q_q) != (num_q, num_q) or np.shape(g_g) != (num_g, num_g):
    raise ValueError(
      f'rerank needs q_q [{num_q}, {num_q}] and g_g [{num_g}, {num_g}] beside q_g '
      f'{q_g.shape}; got {np.shape(q_q)} and {np.shape(g_g)}'
    )
  n = num_q + num_g
  dist = np.empty((n, n), np.float32)
  dist[:num_q, :num_q] = q_q
  dist[:num_q, num_q:] = q_g
  dist[num_q:, :num_q] = q_g.T
  dist[num_q:, num_q:] = g_g
  np.square(dist, out=dist)
  # The reference's transpose(d / max(d, axis=0)): row i is column i over its maximum.
  dist /= np.maximum(dist.max(axis=0), np.finfo(np.float32).tiny)[None, :]
  dist = np.ascontiguousarray(dist.T)

  k1 = min(settings.k1, n - 1)
  half = min(int(np.around(settings.k1 / 2.0)), n - 1)
  k2 = min(settings.k2, n)
  # [N, max(k1 + 1, k2)], ascending; R(i, k1), R(i, k1 / 2) and the k2 nearest are prefixes.
  nearest = _nearest(dist, max(k1 + 1, k2))
  reciprocal = _reciprocal(nearest[:, : k1 + 1])
  half_reciprocal = _reciprocal(nearest[:, : half + 1])

  # Expansion: c in R(i, k1) adds R(c, k1/2) when |R(c, k1/2) & R(i, k1)| > 2/3 |R(c, k1/2)|.
  overlap = (reciprocal @ half_reciprocal.T).multiply(reciprocal).tocoo()
  sizes = np.asarray(half_reciprocal.sum(axis=1)).ravel()
  keep = overlap.data > 2.0 / 3.0 * sizes[overlap.col]
  take = sp.csr_matrix(
    (np.ones(keep.sum(), np.float32), (overlap.row[keep], overlap.col[keep])), shape=(n, n)
  )
  expanded = (reciprocal + take @ half_reciprocal).tocsr()
  expanded.sum_duplicates()
  expanded.sort_indices()
  rows = np.repeat(np.arange(n), np.diff(expanded.indptr))
  weight = np.exp(-dist[rows, expanded.indices]).astype(np.float64)
  weight /= np.bincount(rows, weights=weight, minlength=n)[rows]
  encoding = sp.csr_matrix((weight, expanded.indices, expanded.indptr), shape=(n, n))
  if k2 != 1:  # query expansion: the mean over each image's k2 nearest
    mean = sp.csr_matrix(
      (np.full(n * k2, 1.0 / k2), (np.repeat(np.arange(n), k2), nearest[:, :k2].ravel())),
      shape=(n, n),
    )
    encoding = (mean @ encoding).tocsr()
  encoding.eliminate_zeros()

  jaccard = _jaccard(encoding[:num_q], encoding[num_q:].tocsc(), num_g, chunk)
  lam = settings.lambda_value
  return ((1.0 - lam) * jaccard + lam * dist[:num_q, num_q:]).astype(np.float32)


def _nearest(dist: np.ndarray, k: int) -> np.ndarray:
  """[N, k] column indices of each row's k smallest distances, ascending."""
  if k >= dist.shape[1]:
    return np.argsort(dist, axis=1, kind='stable')[:, :k]
  part = np.sort(np.argpartition(dist, k - 1, axis=1)[:, :k], axis=1)
  order = np.argsort(np.take_along_axis(dist, part, axis=1), axis=1, kind='stable')
  return np.take_along_axis(part, order, axis=1)


def _reciprocal(nearest: np.ndarray) -> sp.csr_matrix:
  """[N, N] 0/1: j in i's nearest and i in j's nearest."""
  n, k = nearest.shape
  forward = sp.csr_matrix(
    (np.ones(n * k, np.float32), (np.repeat(np.arange(n), k), nearest.ravel())), shape=(n, n)
  )
  forward.sum_duplicates()
  forward.data[:] = 1.0
  return forward.multiply(forward.T).tocsr()


def _jaccard(probes: sp.csr_matrix, gallery: sp.csc_matrix, num_g: int, chunk: int) -> np.ndarray:
  """[P, G] 1 - m / (2 - m), m = sum_k min(probes[p, k], gallery[g, k]).

  Joins each probe non-zero (p, k) with the gallery non-zeros of column k,
  ``chunk`` probes at a time.
  """
  out = np.empty((probes.shape[0], num_g), np.float32)
  col_start, col_count = gallery.indptr[:-1], np.diff(gallery.indptr)
  for start in range(0, probes.shape[0], chunk):
    block = probes[start : start + chunk].tocoo()
    counts = col_count[block.col]
    total = int(counts.sum())
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    where = np.repeat(col_start[block.col], counts) + offsets
    both = np.minimum(np.repeat(block.data, counts), gallery.data[where])
    cells = np.repeat(block.row, counts) * num_g + gallery.indices[where]
    rows = block.shape[0]
    m = np.bincount(cells, weights=both, minlength=rows * num_g).reshape(rows, num_g)
    out[start : start + rows] = 1.0 - m / (2.0 - m)
  return out
