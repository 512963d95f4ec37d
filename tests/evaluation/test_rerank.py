"""k-reciprocal re-ranking against the straightforward loops of the reference."""

import numpy as np
import pytest
from reference_rerank import reference_rerank

from cal_jax.evaluation import rerank as rerank_lib


def _features(rng, n, ids=12, dim=16):
  """Clustered unit features: identities as centres, so neighbour sets are non-trivial."""
  centres = rng.normal(size=(ids, dim))
  x = centres[rng.integers(0, ids, n)] + 0.6 * rng.normal(size=(n, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
  'num_q,num_g,k1,k2,lam',
  [
    (40, 90, 20, 6, 0.3),
    (25, 60, 8, 3, 0.5),
    (30, 50, 20, 1, 0.0),
    (6, 9, 20, 6, 0.3),
    (30, 50, 3, 9, 0.3),  # k2 > k1 + 1: the config rules allow it
    (10, 12, 2, 30, 0.3),  # k2 beyond the N images
  ],
)
def test_rerank_matches_the_reference_loops(num_q, num_g, k1, k2, lam):
  rng = np.random.default_rng(num_q + num_g)
  q, g = _features(rng, num_q), _features(rng, num_g)
  q_g, q_q, g_g = (rerank_lib.euclidean(a, b) for a, b in ((q, g), (q, q), (g, g)))
  want = reference_rerank(q_g, q_q, g_g, k1, k2, lam)
  got = rerank_lib.rerank(q_g, q_q, g_g, rerank_lib.RerankSettings(k1, k2, lam), chunk=7)
  assert got.shape == (num_q, num_g)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # It is not the identity: the Jaccard term reorders some galleries (unless the query
  # expansion averages all N images, which makes every Jaccard distance the same).
  if lam < 1 and k2 < num_q + num_g:
    assert (np.argsort(got, 1)[:, :5] != np.argsort(q_g, 1)[:, :5]).any()


def test_euclidean_matches_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 7)), rng.normal(size=(4, 7))
  want = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
  np.testing.assert_allclose(rerank_lib.euclidean(a, b), want, rtol=1e-5, atol=1e-5)


def test_rerank_demotes_an_impostor_close_to_the_query_only():
  """The impostor is the query's nearest image, but the query's identity are not
  its neighbours; re-ranking puts four of the five true matches before it."""
  rng = np.random.default_rng(0)
  cluster = rng.normal(size=8)
  members = cluster + 0.3 * rng.normal(size=(6, 8))  # the query and five of its identity
  impostor = members[0] + 0.2 * rng.normal(size=8)
  others = rng.normal(size=(30, 8)) * 3.0
  q = members[:1]
  g = np.concatenate([impostor[None], members[1:], others])
  q_g, q_q, g_g = (rerank_lib.euclidean(a, b) for a, b in ((q, g), (q, q), (g, g)))
  got = rerank_lib.rerank(q_g, q_q, g_g, rerank_lib.RerankSettings(k1=5, k2=1, lambda_value=0.1))
  assert np.argsort(q_g[0])[0] == 0  # by distance, the impostor ranks first
  assert list(np.argsort(got[0])).index(0) == 4  # re-ranked: behind four true matches


def test_bad_shapes_and_settings_are_refused():
  with pytest.raises(ValueError, match='q_q'):
    rerank_lib.rerank(np.zeros((2, 3)), np.zeros((3, 3)), np.zeros((3, 3)))
  with pytest.raises(ValueError, match='lambda'):
    rerank_lib.RerankSettings(lambda_value=1.5)
  with pytest.raises(ValueError, match='k1'):
    rerank_lib.RerankSettings(k1=0)
