"""The distances of the test protocols' trials, and each trial's scores.

by_modalities(splits, table)   the protocol keys grouped by (probe, gallery) modality
Distances                      -<f_q, f_g> of a group's trials: one matrix product of
                               every probe against the union of the galleries, each trial
                               its rows and columns; by probe chunks past
                               `union_matrix_bytes`; with re-ranking, its blocks
score(distances, table, split) one trial's CMC, mAP and mINP, in percent
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cal_jax.evaluation import metrics, protocols
from cal_jax.evaluation import rerank as rerank_lib

CMC_RANKS = (1, 5, 10, 20)
# Largest probes x union-of-galleries float32 matrix held whole; beyond it, by probe chunks.
UNION_MATRIX_BYTES = 512 * 2**20


def by_modalities(
  splits: dict[str, list[protocols.Split]], table: protocols.RecordTable
) -> dict[tuple[int, int], list[str]]:
  """Keys grouped by (probe modality, gallery modality), in key order."""
  groups: dict[tuple[int, int], list[str]] = {}
  for key, key_splits in splits.items():
    pairs = set()
    for s in key_splits:
      for name, part in (('query', s.query), ('gallery', s.gallery)):
        if not len(part):
          raise ValueError(
            f'the {name} of {key} (trial {s.trial}) is empty: '
            'does the test split hold both modalities?'
          )
        if len(np.unique(table.modality[part])) != 1:
          raise ValueError(f'the {name} of {key} (trial {s.trial}) mixes modalities')
      pairs.add((int(table.modality[s.query[0]]), int(table.modality[s.gallery[0]])))
    if len(pairs) != 1:
      raise ValueError(f'the trials of {key} use different modalities')
    groups.setdefault(pairs.pop(), []).append(key)
  return groups


class Distances:
  """-<f_q, f_g> between every probe and gallery image of some splits.

  One matrix product for all the trials of a group of keys: their probes
  against the union of their galleries (SYSU-MM01: every infrared probe
  against every visible image any draw picks), [R, C] float32; a trial takes
  its rows and columns.

  With re-ranking, the Euclidean probe-gallery, probe-probe and
  gallery-gallery distances of the unions are computed once too, and each
  trial re-ranks its own probes and gallery from their blocks (the k-reciprocal
  sets depend on which images a trial holds).
  """

  def __init__(
    self,
    features: np.ndarray,
    row_of: np.ndarray,
    splits: Sequence[protocols.Split],
    rerank: rerank_lib.RerankSettings | None = None,
    union_matrix_bytes: int = UNION_MATRIX_BYTES,
  ):
    self.rows = np.unique(np.concatenate([s.query for s in splits]))
    self.cols = np.unique(np.concatenate([s.gallery for s in splits]))
    self.features, self.row_of = features, row_of
    self.rerank = rerank
    # Re-ranking needs whole matrices; otherwise a union too large is never formed.
    self.whole = rerank is not None or 4 * len(self.rows) * len(self.cols) <= union_matrix_bytes
    self.chunks: list[metrics.NegativeProducts] = []
    if not self.whole:
      return
    probes, gallery = features[row_of[self.rows]], features[row_of[self.cols]]
    self.matrix = -(probes @ gallery.T)
    if rerank is not None:
      self.q_g = rerank_lib.euclidean(probes, gallery)
      self.q_q = rerank_lib.euclidean(probes, probes)
      self.g_g = rerank_lib.euclidean(gallery, gallery)

  @property
  def chunk_seconds(self) -> float:
    """Time spent in the products computed by probe chunks."""
    return sum(c.seconds for c in self.chunks)

  def of(self, split: protocols.Split) -> np.ndarray | metrics.NegativeProducts:
    """[Q, G] distances of one trial's probes and gallery, in their order."""
    if not self.whole:
      return self._by_chunks(split)
    q = np.searchsorted(self.rows, split.query)
    g = np.searchsorted(self.cols, split.gallery)
    if self.rerank is None:
      return self.matrix[np.ix_(q, g)]
    return rerank_lib.rerank(
      self.q_g[np.ix_(q, g)], self.q_q[np.ix_(q, q)], self.g_g[np.ix_(g, g)], self.rerank
    )

  def _by_chunks(self, split: protocols.Split) -> metrics.NegativeProducts:
    products = metrics.NegativeProducts(
      _contiguous(self.features, self.row_of[split.query]),
      _contiguous(self.features, self.row_of[split.gallery]),
    )
    self.chunks.append(products)
    return products


def _contiguous(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """features[rows], as a view (no copy) where the rows are consecutive."""
  if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
    return features[rows[0] : rows[0] + len(rows)]
  return features[rows]


def score(
  distances: Distances, table: protocols.RecordTable, split: protocols.Split
) -> dict[str, Any]:
  """Metrics of one trial, in percent (see `results.summarize`)."""
  scores = metrics.evaluate_ranking(
    distances.of(split),
    table.id[split.query],
    table.id[split.gallery],
    table.camera[split.query],
    table.camera[split.gallery],
    protocol=split.metric,
    max_rank=max(CMC_RANKS),
  )
  cmc = scores['cmc']
  out: dict[str, float] = {'trial': split.trial}
  out.update({f'R{k}': 100.0 * float(cmc[min(k, len(cmc)) - 1]) for k in CMC_RANKS})
  out['mAP'] = 100.0 * scores['mAP']
  out['mINP'] = 100.0 * scores['mINP']
  out['num_valid_queries'] = scores['num_valid_queries']
  out['num_gallery'] = int(len(split.gallery))
  out['cmc'] = [100.0 * float(v) for v in cmc]
  return out
