"""Each equation of the CAL paper against a plain-numpy formulation written here.

The numpy versions follow the paper's notation with explicit loops where the
paper sums, so they share no code with the JAX implementation.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cal_jax.losses import match_distill
from cal_jax.losses.part_center_loss import part_center_loss
from cal_jax.losses.region_losses import discriminability_loss, diversity_loss
from cal_jax.models import attention_adapter, region_mining

RNG = np.random.default_rng(0)


def np_softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis=-1):
  return np.log(np_softmax(x, axis))


def np_max_pool_same(x, size):
  """[H, W, C] max-pool, stride 1, -inf padding."""
  h, w, _ = x.shape
  pad = size // 2
  out = np.empty_like(x)
  for i in range(h):
    for j in range(w):
      window = x[max(0, i - pad) : i + pad + 1, max(0, j - pad) : j + pad + 1]
      out[i, j] = window.max(axis=(0, 1))
  return out


# ----------------------------------------------------------------- Eq. (3) ---


def test_num_selected_tokens_matches_eq3():
  # 288x144 input, last stride 1 -> 18x9 map; N_p = 4, alpha = 0.6.
  assert region_mining.num_selected_tokens(18 * 9, 4, 0.6) == math.ceil(0.6 * 162 / 4) == 25
  assert region_mining.num_selected_tokens(16, 4, 1.0) == 4
  assert region_mining.num_selected_tokens(10, 4, 0.6) == 2  # ceil(1.5)
  assert region_mining.num_selected_tokens(10, 3, 0.01) == 1


def test_token_selection_and_aggregation_eq3():
  b, n, k, c, n_k = 3, 20, 4, 6, 5
  scores = np_softmax(RNG.normal(size=(b, n, k)), axis=1)
  tokens = RNG.normal(size=(b, n, c))
  expected_sel = np.zeros_like(scores)
  expected_p = np.zeros((b, k, c))
  for bi in range(b):
    for part in range(k):
      top = np.argsort(-scores[bi, :, part])[:n_k]
      expected_sel[bi, top, part] = scores[bi, top, part]
      expected_p[bi, part] = (scores[bi, top, part][:, None] * tokens[bi, top]).sum(0) / scores[
        bi, top, part
      ].sum()
  selected = region_mining.select_top_tokens(jnp.asarray(scores), n_k)
  np.testing.assert_allclose(selected, expected_sel, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
    region_mining.aggregate_parts(selected, jnp.asarray(tokens)), expected_p, rtol=1e-5, atol=1e-6
  )


def test_region_mining_module_matches_numpy():
  """Part scoring (multi-scale pooling, point-wise conv, spatial softmax) + Eq. (3) + Phi."""
  b, h, w, c, k, classes = 2, 6, 4, 5, 3, 7
  x = RNG.normal(size=(b, h, w, c)).astype(np.float32)
  module = region_mining.RegionMining(num_parts=k, select_ratio=0.6, num_classes=classes)
  variables = module.init(jax.random.key(0), x)
  out = module.apply(variables, x)
  kernel = np.asarray(variables['params']['prototypes']['kernel'])
  bias = np.asarray(variables['params']['prototypes']['bias'])
  cls_kernel = np.asarray(variables['params']['part_classifiers']['kernel'])  # [k, C, classes]
  cls_bias = np.asarray(variables['params']['part_classifiers']['bias'])
  n_k = math.ceil(0.6 * h * w / k)
  for bi in range(b):
    pooled = np.concatenate([x[bi], np_max_pool_same(x[bi], 3), np_max_pool_same(x[bi], 5)], -1)
    scores = np_softmax(pooled.reshape(h * w, 3 * c) @ kernel + bias, axis=0)
    np.testing.assert_allclose(out['scores'][bi], scores, rtol=1e-5, atol=1e-6)
    tokens = x[bi].reshape(h * w, c)
    for part in range(k):
      top = np.argsort(-scores[:, part])[:n_k]
      p = (scores[top, part][:, None] * tokens[top]).sum(0) / scores[top, part].sum()
      np.testing.assert_allclose(out['parts'][bi, part], p, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(
        out['part_logits'][bi, part], p @ cls_kernel[part] + cls_bias[part], rtol=1e-4, atol=1e-5
      )


# ------------------------------------------------------------ Eqs. (4), (5) ---


def test_discriminability_loss_eq4():
  b, k, classes = 5, 4, 6
  logits = RNG.normal(size=(b, k, classes))
  labels = RNG.integers(0, classes, size=b)
  expected = np.mean(
    [-sum(np_log_softmax(logits[i, p])[labels[i]] for p in range(k)) for i in range(b)]
  )
  np.testing.assert_allclose(
    discriminability_loss(jnp.asarray(logits), jnp.asarray(labels)), expected, rtol=1e-5
  )


def test_diversity_loss_eq5():
  b, n, k = 3, 12, 4
  selected = np.abs(RNG.normal(size=(b, n, k)))
  expected = []
  for i in range(b):
    gram = selected[i].T @ selected[i]
    expected.append(sum(gram[r, s] for r in range(k) for s in range(k) if s > r))
  np.testing.assert_allclose(diversity_loss(jnp.asarray(selected)), np.mean(expected), rtol=1e-5)


# --------------------------------------------------------------- Eqs. (7)-(10) ---


def np_instance_norm(x, source):
  mean = source.mean(axis=0)
  std = np.sqrt(source.var(axis=0) + 1e-5)
  return (x - mean) / std


def np_mlp(x, p):
  return (
    np.maximum(x @ p['fc1']['kernel'] + p['fc1']['bias'], 0) @ p['fc2']['kernel'] + p['fc2']['bias']
  )


def test_attention_adapter_eqs_7_to_10():
  b, n, k, c, d = 2, 15, 3, 8, 6
  tokens = RNG.normal(loc=2.0, scale=3.0, size=(b, n, c)).astype(np.float32)
  source = RNG.normal(loc=-1.0, scale=0.5, size=(b, n, c)).astype(np.float32)
  parts = RNG.normal(size=(b, k, c)).astype(np.float32)
  adapter = attention_adapter.AttentionAdapter(channels=c, hidden=10, dim=d, channel_reduction=2)
  variables = adapter.init(jax.random.key(1), tokens, parts, source)
  refined, similarity = adapter.apply(variables, tokens, parts, source)
  p = jax.tree_util.tree_map(np.asarray, variables['params'])
  for bi in range(b):
    t_hat = np_mlp(np_instance_norm(tokens[bi], tokens[bi]), p['token_mlp'])  # Eq. 10
    p_hat = np_mlp(np_instance_norm(parts[bi], source[bi]), p['query_mlp'])  # Eqs. 7, 10
    sim = np_softmax(p_hat @ t_hat.T / np.sqrt(d), axis=1)  # Eq. 9
    gates = 1 / (1 + np.exp(-np_mlp(parts[bi], p['channel_mlp'])))
    np.testing.assert_allclose(similarity[bi], sim, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
      refined[bi], (sim @ tokens[bi]) * gates, rtol=1e-4, atol=1e-5
    )  # Eq. 8


def test_instance_norm_removes_style():
  """IN (Eq. 7) makes the similarity invariant to a per-channel affine 'style' of the map."""
  b, n, k, c = 1, 10, 2, 4
  tokens = RNG.normal(size=(b, n, c)).astype(np.float32)
  parts = tokens[:, :k] * 1.0
  scale, shift = RNG.uniform(0.5, 3.0, size=c), RNG.normal(size=c)
  adapter = attention_adapter.AttentionAdapter(channels=c, hidden=8, dim=4)
  variables = adapter.init(jax.random.key(2), tokens, parts, tokens)
  _, sim = adapter.apply(variables, tokens, parts, tokens)
  styled, styled_parts = tokens * scale + shift, parts * scale + shift
  _, sim_styled = adapter.apply(variables, styled, styled_parts, styled)
  np.testing.assert_allclose(sim, sim_styled, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------- Eqs. (13)-(15) ---


def np_unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_part_dist(a, b):
  return np.mean(np.linalg.norm(a - b, axis=-1))


def np_pcl(f_vv, f_ii, f_vi, f_iv, y_v, y_i, sigma):
  """Eq. (14) with the documented normalisation: each sum divided by its valid pairs."""
  f_vv, f_ii, f_vi, f_iv = map(np_unit, (f_vv, f_ii, f_vi, f_iv))
  bsz = len(y_v)
  c_v = np.stack(
    [np.mean([f_vv[i] for i in range(bsz) if y_v[i] == y_v[j]], 0) for j in range(bsz)]
  )  # Eq. 13
  c_i = np.stack(
    [np.mean([f_ii[i] for i in range(bsz) if y_i[i] == y_i[j]], 0) for j in range(bsz)]
  )

  def gather(f, y_f, c, y_c):
    pairs = [(i, j) for i in range(bsz) for j in range(bsz) if y_f[i] == y_c[j]]
    return np.mean([np_part_dist(f[i], c[j]) for i, j in pairs])

  def separate(ca, ya, cb, yb):
    pairs = [(i, j) for i in range(bsz) for j in range(bsz) if ya[i] != yb[j]]
    return np.mean([max(sigma - np_part_dist(ca[i], cb[j]), 0.0) for i, j in pairs])

  return (
    gather(f_vi, y_i, c_i, y_i)
    + gather(f_iv, y_v, c_v, y_v)
    + separate(c_i, y_i, c_v, y_v)
    + separate(c_i, y_i, c_i, y_i)
    + separate(c_v, y_v, c_v, y_v)
  )


def pcl_batch(b=8, k=3, c=5):
  """Four refined features [b, k, c] around four class means, and the two label vectors."""
  y_v = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  y_i = np.array([1, 0, 1, 0, 3, 2, 3, 2])
  base = RNG.normal(size=(4, k, c))
  f = lambda y: base[y] + 0.4 * RNG.normal(size=(b, k, c))
  return f(y_v), f(y_i), f(y_i), f(y_v), y_v, y_i


@pytest.mark.parametrize('sigma', [0.6, 1.5])
def test_part_center_loss_eqs_13_to_15(sigma):
  f_vv, f_ii, f_vi, f_iv, y_v, y_i = pcl_batch()
  expected = np_pcl(f_vv, f_ii, f_vi, f_iv, y_v, y_i, sigma)
  got = part_center_loss(*map(jnp.asarray, (f_vv, f_ii, f_vi, f_iv, y_v, y_i)), margin=sigma)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_part_center_loss_over_devices_equals_whole_batch():
  """Split over two mapped devices (identities kept whole), PCL equals the one-device value."""
  b, k, c = 8, 2, 4
  y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  feats = [RNG.normal(size=(b, k, c)).astype(np.float32) for _ in range(4)]
  whole = part_center_loss(*feats, y, y, margin=0.6)
  split = lambda x: x.reshape(2, b // 2, *x.shape[1:])
  per_device = jax.pmap(
    lambda a, bb, cc, dd, yv, yi: part_center_loss(a, bb, cc, dd, yv, yi, 0.6, 'batch'),
    axis_name='batch',
  )(*map(split, feats), split(y), split(y))
  # The gather terms average per device; the mean over devices is the whole-batch mean.
  np.testing.assert_allclose(np.mean(per_device), whole, rtol=1e-5)


def np_pcl_sum(f_vv, f_ii, f_vi, f_iv, y_v, y_i, sigma):
  """Eq. (14) as written: a sum over every pair (i, j) of the five terms of Eq. (15), with
  ||.||_2 of the whole raw feature [N_p, C] (no normalisation, no mean)."""
  bsz = len(y_v)
  dist = lambda a, b: np.sqrt(np.sum((a - b) ** 2))
  centroid = lambda f, y, j: np.mean([f[i] for i in range(bsz) if y[i] == y[j]], 0)
  c_v = [centroid(f_vv, y_v, j) for j in range(bsz)]  # Eq. 13
  c_i = [centroid(f_ii, y_i, j) for j in range(bsz)]
  total = 0.0
  for i in range(bsz):
    for j in range(bsz):
      total += (y_i[i] == y_i[j]) * dist(f_vi[i], c_i[j])  # g(f^{V,I}_i, c^I_j)
      total += (y_v[i] == y_v[j]) * dist(f_iv[i], c_v[j])  # g(f^{I,V}_i, c^V_j)
      for ca, ya, cb, yb in ((c_i, y_i, c_v, y_v), (c_i, y_i, c_i, y_i), (c_v, y_v, c_v, y_v)):
        total += (ya[i] != yb[j]) * max(sigma - dist(ca[i], cb[j]), 0.0)
  return total


@pytest.mark.parametrize('sigma', [0.6, 9.0])
def test_part_center_loss_sum_is_eq14_as_written(sigma):
  """pcl_reduction='sum' against a double loop over (i, j); sigma 9 makes the separation
  terms active on these raw features (norms about 4), 0.6 leaves only the gather terms."""
  f_vv, f_ii, f_vi, f_iv, y_v, y_i = pcl_batch()
  expected = np_pcl_sum(f_vv, f_ii, f_vi, f_iv, y_v, y_i, sigma)
  got = part_center_loss(
    *map(jnp.asarray, (f_vv, f_ii, f_vi, f_iv, y_v, y_i)),
    margin=sigma,
    reduction='sum',
    features='raw',
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Not the normalised mean, and it scales with the features (raw, not unit vectors).
  assert abs(float(got) - np_pcl(f_vv, f_ii, f_vi, f_iv, y_v, y_i, sigma)) > 1.0
  if sigma < 1:
    doubled = part_center_loss(
      *map(jnp.asarray, (2 * f_vv, 2 * f_ii, 2 * f_vi, 2 * f_iv, y_v, y_i)),
      sigma,
      reduction='sum',
      features='raw',
    )
    np.testing.assert_allclose(doubled, 2 * expected, rtol=1e-5)


def test_part_center_loss_sum_on_unit_parts():
  """pcl_features='unit_parts' (the default of both formulations) is Eq. 14's double loop
  on features whose every part is first divided by its norm: it does not change when a
  part is scaled, and sigma = 0.6 then makes separation terms active (the centroids of
  unit parts lie within 2 sqrt(N_p) of each other)."""
  f_vv, f_ii, f_vi, f_iv, y_v, y_i = pcl_batch()
  unit = lambda f: f / np.linalg.norm(f, axis=-1, keepdims=True)
  for sigma in (0.6, 3.0):
    expected = np_pcl_sum(*map(unit, (f_vv, f_ii, f_vi, f_iv)), y_v, y_i, sigma)
    with_separation = np_pcl_sum(*map(unit, (f_vv, f_ii, f_vi, f_iv)), y_v, y_i, 0.0)
    got = part_center_loss(
      *map(jnp.asarray, (f_vv, f_ii, f_vi, f_iv, y_v, y_i)), sigma, reduction='sum'
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    if sigma == 3.0:
      assert expected > with_separation + 1.0  # the margin is active on this scale
  scaled = [f * RNG.uniform(0.5, 5.0, size=f.shape[:-1] + (1,)) for f in (f_vv, f_ii, f_vi, f_iv)]
  np.testing.assert_allclose(
    part_center_loss(*map(jnp.asarray, (*scaled, y_v, y_i)), 0.6, reduction='sum'),
    np_pcl_sum(*map(unit, (f_vv, f_ii, f_vi, f_iv)), y_v, y_i, 0.6),
    rtol=1e-5,
  )


def test_raw_features_go_with_the_sum_only():
  f = jnp.ones((2, 1, 3))
  with pytest.raises(
    ValueError, match="pcl_features='raw' goes with config.loss.pcl_reduction='sum'"
  ):
    part_center_loss(f, f, f, f, jnp.array([0, 1]), jnp.array([0, 1]), 0.6, features='raw')
  with pytest.raises(ValueError, match='config.loss.pcl_features must be one of unit_parts, raw'):
    part_center_loss(f, f, f, f, jnp.array([0, 1]), jnp.array([0, 1]), 0.6, features='l1')


def test_part_center_loss_sum_over_devices_equals_whole_batch():
  """Split over two mapped devices, the mean over devices (the train step's pmean) of the
  summed PCL is the whole batch's sum, values and gradients."""
  b, k, c = 8, 2, 4
  y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  feats = [RNG.normal(size=(b, k, c)).astype(np.float32) for _ in range(4)]
  loss = lambda *f: part_center_loss(*f, y, y, 5.0, reduction='sum', features='raw')
  whole, whole_grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*feats)
  split = lambda x: x.reshape(2, b // 2, *x.shape[1:])

  def per_device(a, bb, cc, dd, yv, yi):
    value = lambda *f: part_center_loss(*f, yv, yi, 5.0, 'batch', reduction='sum', features='raw')
    v, g = jax.value_and_grad(value, argnums=(0, 1, 2, 3))(a, bb, cc, dd)
    return jax.lax.pmean(v, 'batch'), g

  value, grads = jax.pmap(per_device, axis_name='batch')(*map(split, feats), split(y), split(y))
  np.testing.assert_allclose(value[0], whole, rtol=1e-5)
  for got, expected in zip(grads, whole_grads):
    # pmean of the per-device gradients of the per-device losses = the whole batch's gradient
    # (each device's rows here are its own samples' share).
    np.testing.assert_allclose(got.reshape(expected.shape) / 2, expected, rtol=1e-4, atol=1e-6)


def test_unknown_pcl_reduction_is_refused_by_name():
  f = jnp.zeros((2, 1, 3))
  with pytest.raises(ValueError, match='config.loss.pcl_reduction must be one of sum'):
    part_center_loss(f, f, f, f, jnp.array([0, 1]), jnp.array([0, 1]), 0.6, reduction='mean')


# ------------------------------------------------------------- Eqs. (16)-(19) ---


def brute_force_assignment(w):
  best, best_perm = -np.inf, None
  for perm in itertools.permutations(range(w.shape[0])):
    total = sum(w[r, perm[r]] for r in range(w.shape[0]))
    if total > best:
      best, best_perm = total, perm
  return np.array(best_perm), best


@pytest.mark.parametrize('num_parts', [2, 3, 4, 5, 6])
def test_host_assignment_is_optimal_eq17(num_parts):
  weights = RNG.random(size=(20, num_parts, num_parts))
  perms = match_distill.solve_assignments_on_host(weights)
  for w, perm in zip(weights, perms):
    _, best = brute_force_assignment(w)
    assert sorted(perm.tolist()) == list(range(num_parts))
    np.testing.assert_allclose(sum(w[r, perm[r]] for r in range(num_parts)), best, rtol=1e-12)


def test_match_queries_in_jit_and_no_gradient_through_assignment():
  weights = jnp.asarray(RNG.random(size=(6, 4, 4)), jnp.float32)
  perm = jax.jit(match_distill.match_queries)(weights)
  for w, p in zip(np.asarray(weights), np.asarray(perm)):
    np.testing.assert_array_equal(p, brute_force_assignment(w)[0])
  # d/dW of -sum_{e in M} w(e) is -1 on the matched edges and 0 elsewhere.
  grad = jax.jit(
    jax.grad(lambda w: match_distill.feature_distill_loss(w, match_distill.match_queries(w)))
  )(weights)
  expected = np.zeros(weights.shape)
  for bi, p in enumerate(np.asarray(perm)):
    expected[bi, np.arange(4), p] = -1.0 / weights.shape[0]
  np.testing.assert_allclose(grad, expected, atol=1e-7)


def test_edge_weights_eq16_and_feature_distillation_eq18():
  b, k, n = 4, 3, 10
  sim_cross = np_softmax(RNG.normal(size=(b, k, n)), axis=-1)
  sim_self = np_softmax(RNG.normal(size=(b, k, n)), axis=-1)
  w = match_distill.edge_weights(jnp.asarray(sim_cross), jnp.asarray(sim_self))
  expected_w = np.array(
    [
      [
        [sum(sim_cross[bi, k1, t] * sim_self[bi, k2, t] for t in range(n)) for k2 in range(k)]
        for k1 in range(k)
      ]
      for bi in range(b)
    ]
  )
  np.testing.assert_allclose(w, expected_w, rtol=1e-5)
  perm = match_distill.solve_assignments_on_host(np.asarray(w))
  expected_kd1 = -np.mean([brute_force_assignment(expected_w[bi])[1] for bi in range(b)])
  np.testing.assert_allclose(
    match_distill.feature_distill_loss(w, jnp.asarray(perm)), expected_kd1, rtol=1e-5
  )


def test_logit_distillation_eq19():
  b, k, classes = 3, 4, 5
  cross = RNG.normal(size=(b, k, classes))
  partner_self = RNG.normal(size=(b, k, classes))
  perm = np.stack([RNG.permutation(k) for _ in range(b)])
  expected = []
  for bi in range(b):
    total = 0.0
    for u in range(k):
      v = perm[bi, u]
      p, q = np_softmax(cross[bi, u], -1), np_softmax(partner_self[bi, v], -1)
      total += np.sum(p * np.log(p / q))
    expected.append(total)
  got = match_distill.logit_distill_loss(
    jnp.asarray(cross), jnp.asarray(partner_self), jnp.asarray(perm)
  )
  np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)
  # The cross-refined distribution is the teacher: no gradient reaches it.
  grad_cross = jax.grad(
    lambda x: match_distill.logit_distill_loss(x, jnp.asarray(partner_self), jnp.asarray(perm))
  )(jnp.asarray(cross))
  np.testing.assert_array_equal(grad_cross, 0.0)


def test_permutation_rank_is_lexicographic_and_invertible():
  for n in (1, 2, 3, 4, 5):
    perms = np.array(list(itertools.permutations(range(n))), dtype=np.int32)
    np.testing.assert_array_equal(
      match_distill.permutation_rank(jnp.asarray(perms)), np.arange(len(perms))
    )
    for rank, perm in enumerate(perms):
      np.testing.assert_array_equal(match_distill.permutation_from_rank(rank, n), perm)


def test_invert_permutations():
  perms = np.stack([RNG.permutation(5) for _ in range(7)]).astype(np.int32)
  inv = np.asarray(match_distill.invert_permutations(jnp.asarray(perms)))
  for p, q in zip(perms, inv):
    np.testing.assert_array_equal(p[q], np.arange(5))
