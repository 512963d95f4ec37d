"""Tests of cal_jax.evaluation.metrics: hand-computed cases and agreement with loops."""

import numpy as np
import pytest
from reference_eval import loop_eval

from cal_jax.evaluation import metrics
from cal_jax.evaluation.metrics import evaluate_ranking

RTOL = 1e-12


def _check(result, cmc, mAP, mINP, num_valid):
  np.testing.assert_allclose(result['cmc'], cmc, rtol=RTOL, atol=0)
  np.testing.assert_allclose(result['mAP'], mAP, rtol=RTOL)
  np.testing.assert_allclose(result['mINP'], mINP, rtol=RTOL)
  assert result['num_valid_queries'] == num_valid


def test_regdb_hand_computed():
  # Query 0 (id 1) ranks g0, g2, g4, g1, g3: ids 1, 1, 2, 2, 3 -> hits at
  # ranks 1, 2. Query 1 (id 2) ranks g0, g2, g3, g1, g4: ids 1, 1, 3, 2, 2 ->
  # hits at ranks 4, 5: AP (1/4 + 2/5) / 2, INP 2/5.
  d = np.array([[0.1, 0.5, 0.2, 0.9, 0.3], [0.1, 0.8, 0.2, 0.3, 0.9]])
  r = evaluate_ranking(d, np.array([1, 2]), np.array([1, 2, 1, 3, 2]), protocol='regdb', max_rank=5)
  _check(r, [0.5, 0.5, 0.5, 1.0, 1.0], (1.0 + 0.325) / 2, (1.0 + 0.4) / 2, 2)


def test_sysu_cam3_query_drops_cam2_gallery():
  # Gallery: g0 id 1 cam 2 (closest), g1 id 2 cam 1, g2 id 1 cam 1, g3 id 3
  # cam 4. The cam-3 query loses g0: its list is ids 2, 1, 3 (hit at rank 2).
  # The cam-6 query keeps it: ids 1, 2, 1, 3 (hits at ranks 1 and 3).
  d = np.tile([0.1, 0.2, 0.3, 0.4], (2, 1))
  r = evaluate_ranking(
    d,
    np.array([1, 1]),
    np.array([1, 2, 1, 3]),
    np.array([3, 6]),
    np.array([2, 1, 1, 4]),
    protocol='sysu',
    max_rank=3,
  )
  ap3, ap6 = 1 / 2, (1 + 2 / 3) / 2
  inp3, inp6 = 1 / 2, 2 / 3
  _check(r, [0.5, 1.0, 1.0], (ap3 + ap6) / 2, (inp3 + inp6) / 2, 2)


def test_sysu_keeps_cam2_for_other_queries_and_cam3_gallery_rule_only():
  # A cam-3 query drops cam-2 images of every identity, not only its own;
  # other cameras are never dropped.
  d = np.array([[0.1, 0.2, 0.3]])
  g_pids, g_cams = np.array([2, 1, 1]), np.array([2, 2, 5])
  r3 = evaluate_ranking(d, np.array([1]), g_pids, np.array([3]), g_cams, max_rank=2)
  _check(r3, [1.0, 1.0], 1.0, 1.0, 1)  # list: g2 only
  r6 = evaluate_ranking(d, np.array([1]), g_pids, np.array([6]), g_cams, max_rank=2)
  _check(r6, [0.0, 1.0], (1 / 2 + 2 / 3) / 2, 2 / 3, 1)


def test_unique_identity_cmc_in_multi_shot():
  # Ranked ids 2, 2, 2, 3, 1, 1: the first hit is image rank 5 but identity
  # rank 3 (list 2, 3, 1). mAP / mINP use the image ranks.
  d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
  g_pids = np.array([2, 2, 2, 3, 1, 1])
  g_cams = np.array([1, 2, 4, 5, 1, 4])
  r = evaluate_ranking(d, np.array([1]), g_pids, np.array([6]), g_cams, protocol='sysu', max_rank=5)
  _check(r, [0, 0, 1, 1, 1], (1 / 5 + 2 / 6) / 2, 2 / 6, 1)
  plain = evaluate_ranking(d, np.array([1]), g_pids, protocol='regdb', max_rank=5)
  _check(plain, [0, 0, 0, 0, 1], (1 / 5 + 2 / 6) / 2, 2 / 6, 1)


def test_unique_identity_list_counts_identities_after_removal():
  # Cam-3 query: id 2's only image ahead of the hit is in cam 2, so it is
  # removed and does not take a place in the identity list.
  d = np.array([[0.1, 0.2, 0.3, 0.4]])
  g_pids = np.array([2, 3, 3, 1])
  g_cams = np.array([2, 1, 4, 1])
  r = evaluate_ranking(d, np.array([1]), g_pids, np.array([3]), g_cams, max_rank=3)
  _check(r, [0, 1, 1], 1 / 3, 1 / 3, 1)


def test_skipped_queries_are_left_out_of_every_mean():
  # q0: id 9 absent from the gallery. q1 (cam 3): its only match is in cam 2.
  # q2: hit at rank 2. Only q2 counts.
  d = np.array([[0.1, 0.2, 0.3]] * 3)
  g_pids, g_cams = np.array([1, 2, 3]), np.array([2, 1, 4])
  r = evaluate_ranking(d, np.array([9, 1, 2]), g_pids, np.array([6, 3, 6]), g_cams, max_rank=3)
  _check(r, [0, 1, 1], 1 / 2, 1 / 2, 1)


def test_all_queries_invalid_raises():
  d = np.zeros((2, 3))
  with pytest.raises(ValueError, match='no query identity'):
    evaluate_ranking(d, np.array([7, 8]), np.array([1, 2, 3]), protocol='regdb', max_rank=3)


def test_llcm_drops_same_identity_same_camera_only():
  # g0 (id 1, cam 4) is the query's own camera: removed. g1 (id 2, cam 4)
  # is kept: another identity. Kept list: g1, g2 -> hit at rank 2.
  d = np.array([[0.1, 0.2, 0.3]])
  r = evaluate_ranking(
    d,
    np.array([1]),
    np.array([1, 2, 1]),
    np.array([4]),
    np.array([4, 4, 5]),
    protocol='llcm',
    max_rank=3,
  )
  _check(r, [0, 1, 1], 1 / 2, 1 / 2, 1)


def test_ties_keep_gallery_order():
  # Equal distances: the stable rule ranks g0 (id 2) before g1, g2 (id 1).
  d = np.zeros((1, 3))
  r = evaluate_ranking(d, np.array([1]), np.array([2, 1, 1]), protocol='regdb', max_rank=3)
  _check(r, [0, 1, 1], (1 / 2 + 2 / 3) / 2, 2 / 3, 1)


def test_max_rank_is_cut_to_gallery_size():
  with pytest.warns(UserWarning, match='cut to 2 ranks'):
    r = evaluate_ranking(
      np.array([[0.2, 0.1]]), np.array([1]), np.array([1, 2]), protocol='regdb', max_rank=20
    )
  _check(r, [0, 1], 1 / 2, 1 / 2, 1)


@pytest.mark.parametrize(
  'bad',
  [
    dict(protocol='market'),
    dict(q_camids=None),
    dict(distmat=np.full((2, 3), np.nan)),
    dict(q_pids=np.array([1])),
  ],
)
def test_bad_inputs_raise(bad):
  args = dict(
    distmat=np.zeros((2, 3)),
    q_pids=np.array([1, 2]),
    g_pids=np.array([1, 2, 3]),
    q_camids=np.array([3, 6]),
    g_camids=np.array([1, 2, 4]),
    protocol='sysu',
    max_rank=3,
  )
  args.update(bad)
  with pytest.raises(ValueError):
    evaluate_ranking(**args)


def _random_case(seed, protocol, shots, decimals=0):
  """A small test set of realistic shape, with quantised (tied) distances
  (decimals=None: unrounded, distinct)."""
  rng = np.random.default_rng(seed)
  num_ids, dim = 40, 16
  centres = rng.normal(size=(num_ids + 5, dim))
  if protocol == 'sysu':
    q_cam_set, g_cam_set = (3, 6), (1, 2, 4, 5)
  elif protocol == 'llcm':
    q_cam_set = g_cam_set = tuple(range(1, 10))
  else:
    q_cam_set, g_cam_set = (1,), (2,)
  g_pids, g_cams = [], []
  for pid in range(num_ids):
    for cam in g_cam_set:
      if rng.random() < 0.75:
        g_pids += [pid] * shots
        g_cams += [cam] * shots
  # Five query identities are absent from the gallery: skipped queries.
  q_pids = rng.integers(0, num_ids + 5, size=150)
  q_cams = rng.choice(q_cam_set, size=150)
  g_pids, g_cams = np.array(g_pids), np.array(g_cams)
  q_feat = centres[q_pids] + 0.9 * rng.normal(size=(len(q_pids), dim))
  g_feat = centres[g_pids] + 0.9 * rng.normal(size=(len(g_pids), dim))
  # Negative inner products as the reference uses, rounded to force ties.
  d = -q_feat @ g_feat.T
  if decimals is not None:
    d = np.round(d, decimals)
  return d, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize(
  'protocol,shots',
  [('sysu', 1), ('sysu', 10), ('llcm', 1), ('llcm', 3), ('regdb', 1), ('regdb', 10)],
)
@pytest.mark.parametrize('seed', [0, 1])
def test_agrees_with_loop_reference(protocol, shots, seed):
  d, q_pids, g_pids, q_cams, g_cams = _random_case(seed, protocol, shots)
  assert len(np.unique(d)) < d.size / 4  # plenty of ties
  ref_cmc, ref_map, ref_minp = loop_eval(d, q_pids, g_pids, q_cams, g_cams, protocol=protocol)
  r = evaluate_ranking(d, q_pids, g_pids, q_cams, g_cams, protocol=protocol)
  # The reference accumulates the CMC in float32; ours is float64 and equal
  # to it once rounded to float32.
  np.testing.assert_array_equal(r['cmc'].astype(np.float32), ref_cmc)
  np.testing.assert_allclose(r['mAP'], ref_map, rtol=RTOL)
  np.testing.assert_allclose(r['mINP'], ref_minp, rtol=RTOL)
  assert 0 < r['num_valid_queries'] < len(q_pids)


@pytest.mark.parametrize(
  'protocol,shots', [('sysu', 1), ('sysu', 10), ('llcm', 3), ('regdb', 1), ('regdb', 10)]
)
def test_sorted_distances_path_agrees_with_loop_reference(protocol, shots, monkeypatch):
  """Distinct distances are scored from the sorted rows (no argsort); the rows where a
  correct match ties another distance, or sits at +inf, go to the full stable ranking.
  Both against the loop reference, and the full ranking sees exactly those rows."""
  d, q_pids, g_pids, q_cams, g_cams = _random_case(7, protocol, shots, decimals=None)
  # Row 0: a correct match ties an impostor; row 1: -0.0 against 0.0 (equal); row 2: a
  # correct match at +inf; row 3: an impostor at -inf (no tie).
  for row in range(4):
    q_pids[row] = g_pids[row]
  match0 = np.flatnonzero(g_pids == q_pids[0])[0]
  other0 = np.flatnonzero(g_pids != q_pids[0])[0]
  d[0, other0] = d[0, match0]
  match1 = np.flatnonzero(g_pids == q_pids[1])[0]
  other1 = np.flatnonzero(g_pids != q_pids[1])[0]
  d[1, match1], d[1, other1] = 0.0, -0.0
  d[2, np.flatnonzero(g_pids == q_pids[2])[-1]] = np.inf
  d[3, np.flatnonzero(g_pids != q_pids[3])[0]] = -np.inf
  seen = []
  exact = metrics._score_chunk_ranked

  def spy(chunk, *args):
    seen.append(len(chunk))
    return exact(chunk, *args)

  monkeypatch.setattr(metrics, '_score_chunk_ranked', spy)
  ref_cmc, ref_map, ref_minp = loop_eval(d, q_pids, g_pids, q_cams, g_cams, protocol=protocol)
  r = evaluate_ranking(d, q_pids, g_pids, q_cams, g_cams, protocol=protocol)
  np.testing.assert_array_equal(r['cmc'].astype(np.float32), ref_cmc)
  np.testing.assert_allclose(r['mAP'], ref_map, rtol=RTOL)
  np.testing.assert_allclose(r['mINP'], ref_minp, rtol=RTOL)
  # Rows 0-2 and nothing else (in llcm one of them loses its tie to the removal).
  assert sum(seen) in (2, 3)


@pytest.mark.parametrize('protocol', ['sysu', 'llcm', 'regdb'])
def test_chunking_does_not_change_results(protocol):
  d, q_pids, g_pids, q_cams, g_cams = _random_case(3, protocol, 2)
  whole = evaluate_ranking(d, q_pids, g_pids, q_cams, g_cams, protocol=protocol)
  for budget in (1, 40 * d.shape[1] * 7):  # 1 query, then a few, per chunk
    part = evaluate_ranking(
      d, q_pids, g_pids, q_cams, g_cams, protocol=protocol, memory_budget=budget
    )
    np.testing.assert_array_equal(part['cmc'], whole['cmc'])
    np.testing.assert_allclose(part['mAP'], whole['mAP'], rtol=RTOL)
    assert part['mINP'] == whole['mINP']


def test_float32_distances_and_small_int_ids():
  d, q_pids, g_pids, q_cams, g_cams = _random_case(4, 'sysu', 1)
  r64 = evaluate_ranking(d, q_pids, g_pids, q_cams, g_cams)
  r32 = evaluate_ranking(
    d.astype(np.float32), q_pids.astype(np.int32), g_pids.astype(np.int16), q_cams, g_cams
  )
  np.testing.assert_array_equal(r32['cmc'], r64['cmc'])
  assert r32['mAP'] == pytest.approx(r64['mAP'], rel=RTOL)


def test_ranking_equals_stable_argsort():
  rng = np.random.default_rng(5)
  d = rng.normal(size=(64, 50))
  d[::3] = np.round(d[::3], 0)  # every third row tied
  d[1, :4] = [0.0, -0.0, np.inf, -np.inf]
  d[2, 10:] = np.inf
  np.testing.assert_array_equal(metrics._rank(d), np.argsort(d, axis=1, kind='stable'))


def test_negative_products_by_chunks_equal_the_whole_matrix():
  """`NegativeProducts` gives evaluate_ranking the distances chunk by chunk: the same
  metrics as the [Q, G] matrix, with chunks of a few queries (a tiny budget)."""
  rng = np.random.default_rng(5)
  q, g = rng.normal(size=(37, 6)).astype(np.float32), rng.normal(size=(90, 6)).astype(np.float32)
  q_ids, g_ids = rng.integers(0, 9, 37), rng.integers(0, 9, 90)
  q_cams, g_cams = rng.choice([3, 6], 37), rng.choice([1, 2, 4, 5], 90)
  whole = metrics.evaluate_ranking(-(q @ g.T), q_ids, g_ids, q_cams, g_cams, max_rank=10)
  products = metrics.NegativeProducts(q, g)
  chunked = metrics.evaluate_ranking(
    products, q_ids, g_ids, q_cams, g_cams, max_rank=10, memory_budget=32 * 90 * 4
  )
  np.testing.assert_allclose(chunked['cmc'], whole['cmc'], atol=1e-12)
  for name in ('mAP', 'mINP', 'num_valid_queries'):
    assert chunked[name] == pytest.approx(whole[name], abs=1e-12)
  assert products.seconds > 0
  with pytest.raises(ValueError, match=r'\[Q, D\] and \[G, D\]'):
    metrics.NegativeProducts(q, g[:, :5])
