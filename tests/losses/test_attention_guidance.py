"""The attention guidance (not in the paper): each part's TSAA map pulled towards its DRM region."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from loss_fakes import fake_outputs, loss_weights

from cal_jax.losses import region_losses
from cal_jax.losses.objective import cal_objective
from cal_jax.models import attention_adapter

RNG = np.random.default_rng(11)


def np_guidance(sim, selected):
  """mean over images and parts of sum_n q log(q / s), q = S_hat_k normalised, 0 log 0 = 0."""
  b, parts, _ = sim.shape
  total = 0.0
  for i in range(b):
    for k in range(parts):
      q = selected[i, :, k] / selected[i, :, k].sum()
      kept = q > 0
      total += float(np.sum(q[kept] * np.log(q[kept] / sim[i, k, kept])))
  return total / (b * parts)


def top_k_selection(scores, k):
  """S_hat of Eq. (3): each part's k highest scores kept, the rest 0. scores [B, N, N_p]."""
  keep = np.argsort(-scores, axis=1)[:, :k, :]
  selected = np.zeros_like(scores)
  np.put_along_axis(selected, keep, np.take_along_axis(scores, keep, axis=1), axis=1)
  return selected


def test_guidance_against_numpy():
  logits = RNG.normal(size=(3, 4, 10))
  sim = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  selected = top_k_selection(RNG.uniform(size=(3, 10, 4)), 3)
  got = region_losses.attention_guidance_loss(jnp.asarray(sim), jnp.asarray(selected))
  np.testing.assert_allclose(float(got), np_guidance(sim, selected), rtol=1e-5)


def test_optimum_is_the_spread_region_not_a_one_hot_map():
  selected = top_k_selection(RNG.uniform(size=(2, 12, 3)), 4)
  target = np.swapaxes(selected / selected.sum(axis=1, keepdims=True), 1, 2)
  at_target = region_losses.attention_guidance_loss(jnp.asarray(target), jnp.asarray(selected))
  assert float(at_target) == pytest.approx(0.0, abs=1e-6)
  assert target.max() < 0.5  # 4 kept tokens: no map at the optimum is one-hot
  one_hot = np.eye(12)[target.argmax(-1)] * (1 - 1e-6) + 1e-6 / 12
  peaked = region_losses.attention_guidance_loss(jnp.asarray(one_hot), jnp.asarray(selected))
  assert float(peaked) > 0.5
  # The gradient in the maps' logits is zero at the optimum, and none reaches S_hat.
  logits = jnp.log(jnp.asarray(target) + 1e-30)
  grad_logits, grad_selected = jax.grad(
    lambda z, s: region_losses.attention_guidance_loss(jax.nn.softmax(z), s), argnums=(0, 1)
  )(logits, jnp.asarray(selected))
  np.testing.assert_allclose(np.asarray(grad_logits), 0.0, atol=1e-6)
  assert not np.any(np.asarray(grad_selected))


def test_guidance_reads_each_modality_s_own_maps_and_regions():
  outputs = fake_outputs()
  labels, partner = jnp.array([0, 1, 0, 1]), jnp.array([2, 3, 0, 1])
  weights = loss_weights(attention_guidance=1.0)
  _, terms, _ = cal_objective(outputs, labels, labels, partner, partner, weights)
  expected = 0.5 * sum(
    np_guidance(np.asarray(outputs[f'sim_{m}'], np.float64), np.asarray(outputs[f'selected_{s}']))
    for m, s in (('vv', 'vis'), ('ii', 'ir'))
  )
  np.testing.assert_allclose(float(terms['attention_guidance']), expected, rtol=1e-5)
  # The cross-refinements' maps do not enter it.
  moved = dict(outputs, sim_vi=outputs['sim_iv'], sim_iv=outputs['sim_vi'])
  _, terms_moved, _ = cal_objective(moved, labels, labels, partner, partner, weights)
  assert float(terms_moved['attention_guidance']) == float(terms['attention_guidance'])
  # Part queries without DRM regions (Table 4's LV and HS): no term.
  no_drm = {k: v for k, v in outputs.items() if not k.startswith('part_logits')}
  _, terms_no_drm, _ = cal_objective(no_drm, labels, labels, partner, partner, weights)
  assert float(terms_no_drm['attention_guidance']) == 0.0


def test_guidance_sends_the_real_adapter_s_parts_to_their_own_regions():
  """The real TSAA on fixed random tokens, trained on the guidance alone: each of
  the 4 queries ends up peaking inside its own (disjoint) region."""
  rng = np.random.default_rng(0)
  b, n, c, parts, k = 8, 32, 16, 4, 5
  tokens = jnp.asarray(rng.normal(size=(b, n, c)), jnp.float32)
  selected = np.zeros((b, n, parts), np.float32)
  regions = np.stack([rng.permutation(n)[: parts * k].reshape(parts, k) for _ in range(b)])
  for i in range(b):
    for p in range(parts):
      selected[i, regions[i, p], p] = rng.uniform(0.5, 1.0, size=k)
  # DRM's P: the selection-weighted mean of the tokens (Eq. 3).
  queries = jnp.einsum('bnk,bnc->bkc', selected, tokens) / selected.sum(axis=1)[..., None]
  adapter = attention_adapter.AttentionAdapter(channels=c, hidden=32, dim=16, channel_reduction=4)
  params = adapter.init(jax.random.key(0), tokens, queries, tokens)['params']

  def maps(params):
    return adapter.apply({'params': params}, tokens, queries, tokens)[1]

  def loss(params):
    return region_losses.attention_guidance_loss(maps(params), jnp.asarray(selected))

  opt = optax.sgd(0.05)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = opt.update(jax.grad(loss)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  start = float(loss(params))
  for _ in range(1500):
    params, opt_state = step(params, opt_state)
  assert float(loss(params)) < 0.3 * start
  peak = np.asarray(jnp.argmax(maps(params), axis=-1))  # [B, N_p]
  inside = [peak[i, p] in regions[i, p] for i in range(b) for p in range(parts)]
  assert np.mean(inside) > 0.9, np.mean(inside)
  stats = attention_adapter.attention_statistics(maps(params))
  assert float(stats['attention_distinct']) > 3.5


def np_guidance_over(sim, selected, attendable):
  """np_guidance with q renormalised over the attendable tokens (0 for a part with none)."""
  b, parts, _ = sim.shape
  total = 0.0
  for i in range(b):
    for k in range(parts):
      q = np.where(attendable, selected[i, :, k], 0.0)
      if q.sum() == 0:
        continue
      q = q / q.sum()
      kept = q > 0
      total += float(np.sum(q[kept] * np.log(q[kept] / sim[i, k, kept])))
  return total / (b * parts)


def test_guidance_with_a_border_is_renormalised_over_the_attendable_tokens():
  """model.attention_border: S is 0 on the border, so DRM's border tokens are out of
  the target. By hand: a region of 4 equal tokens, 2 of them on the border, and S
  spread evenly over the other 2: KL = 0 (it was 2 * 0.25 * (log 0.25 - log tiny))."""
  attendable = jnp.array([False, True, True, False])
  sim = jnp.array([[[0.0, 0.5, 0.5, 0.0]]])
  selected = jnp.full((1, 4, 1), 0.25)
  got = region_losses.attention_guidance_loss(sim, selected, attendable)
  assert float(got) == pytest.approx(0.0, abs=1e-7)
  # A part whose whole region lies on the border: no target, no term.
  on_border = jnp.array([[[0.3], [0.0], [0.0], [0.7]]])
  assert float(region_losses.attention_guidance_loss(sim, on_border, attendable)) == 0.0

  # The real masked Eq. (9) maps through the objective, against numpy.
  b, k, d = 4, 3, 8
  mask = np.asarray(attention_adapter.interior_tokens(6, 4, 1))  # 8 of the 24 tokens
  n = mask.size
  outputs = fake_outputs(b=b, k=k, n=n)
  for name in ('vv', 'ii'):
    queries, tokens = RNG.normal(size=(b, k, d)), RNG.normal(size=(b, n, d))
    outputs[f'sim_{name}'] = attention_adapter.spatial_similarity(
      jnp.asarray(queries, jnp.float32), jnp.asarray(tokens, jnp.float32), jnp.asarray(mask)
    )
  assert not np.asarray(outputs['sim_vv'])[..., ~mask].any()  # S is 0 on the border
  outputs['attention_mask'] = jnp.asarray(mask)
  labels, partner = jnp.array([0, 1, 0, 1]), jnp.array([2, 3, 0, 1])
  _, terms, _ = cal_objective(
    outputs, labels, labels, partner, partner, loss_weights(attention_guidance=1.0)
  )
  expected = 0.5 * sum(
    np_guidance_over(
      np.asarray(outputs[f'sim_{m}'], np.float64), np.asarray(outputs[f'selected_{s}']), mask
    )
    for m, s in (('vv', 'vis'), ('ii', 'ir'))
  )
  np.testing.assert_allclose(float(terms['attention_guidance']), expected, rtol=1e-5)
  assert float(terms['attention_guidance']) < 20  # no ~87 per border token's share
