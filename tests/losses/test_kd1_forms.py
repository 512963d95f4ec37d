"""L_kd1's forms (`config.loss.kd1_form`), the switches of MatchDistill and the
attention statistics, each against a plain-numpy formulation written here.

Eq. (18) as written (`dot`) is minimised by a one-hot student map; the other
forms are minimised by the teacher's own map. Both facts are checked by value
and by following the gradient, on a free map and on the real TSAA.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from loss_fakes import fake_outputs, loss_weights

from cal_jax.losses import match_distill, region_losses
from cal_jax.losses.objective import cal_objective
from cal_jax.models import attention_adapter

RNG = np.random.default_rng(3)
ALIGNING_FORMS = ('cosine', 'kl', 'mse')


def np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_distance(t, s, form):
  """One pair of maps, loops over tokens."""
  n = len(t)
  dot = sum(t[i] * s[i] for i in range(n))
  if form == 'dot':
    return -dot
  if form == 'cosine':
    return 1.0 - dot / (np.sqrt(sum(x * x for x in t)) * np.sqrt(sum(x * x for x in s)))
  if form == 'kl':
    return sum(t[i] * (np.log(t[i]) - np.log(s[i])) for i in range(n))
  if form == 'mse':
    return sum((t[i] - s[i]) ** 2 for i in range(n))
  raise AssertionError(form)


@pytest.mark.parametrize('form', match_distill.KD1_FORMS)
def test_map_distill_loss_against_numpy(form):
  b, k, n = 3, 4, 7
  teacher = np_softmax(RNG.normal(size=(b, k, n)))
  student = np_softmax(RNG.normal(size=(b, k, n)))
  perm = np.stack([RNG.permutation(k) for _ in range(b)]).astype(np.int32)
  expected = np.mean(
    [
      sum(np_distance(teacher[bi, k1], student[bi, perm[bi, k1]], form) for k1 in range(k))
      for bi in range(b)
    ]
  )
  got = match_distill.map_distill_loss(
    jnp.asarray(teacher, jnp.float32), jnp.asarray(student, jnp.float32), jnp.asarray(perm), form
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_dot_form_is_eq18_on_the_edge_weights():
  b, k, n = 4, 3, 9
  teacher = jnp.asarray(np_softmax(RNG.normal(size=(b, k, n))), jnp.float32)
  student = jnp.asarray(np_softmax(RNG.normal(size=(b, k, n))), jnp.float32)
  weights = match_distill.edge_weights(teacher, student)
  perm = match_distill.match_queries(weights)
  np.testing.assert_allclose(
    match_distill.map_distill_loss(teacher, student, perm, 'dot'),
    match_distill.feature_distill_loss(weights, perm),
    rtol=1e-6,
  )


def test_unknown_form_is_refused_naming_the_field():
  maps = jnp.full((1, 2, 3), 1 / 3)
  with pytest.raises(ValueError, match='config.loss.kd1_form'):
    match_distill.map_distill_loss(maps, maps, jnp.zeros((1, 2), jnp.int32), 'dots')


def test_optimum_by_value_one_hot_for_dot_the_teacher_for_the_others():
  teacher = np.array([0.4, 0.3, 0.2, 0.1])
  one_hot = np.array([1.0, 0.0, 0.0, 0.0]) * (1 - 3e-6) + 1e-6
  at = lambda s, form: float(match_distill.map_distance(jnp.asarray(teacher), jnp.asarray(s), form))
  # dot: -0.4 at the one-hot map beats -0.3 at the teacher itself (sum t^2).
  assert at(one_hot, 'dot') < at(teacher, 'dot')
  np.testing.assert_allclose(at(teacher, 'dot'), -np.sum(teacher**2), rtol=1e-6)
  for form in ALIGNING_FORMS:
    assert at(teacher, form) == pytest.approx(0.0, abs=1e-6), form
    assert at(one_hot, form) > 0.1, form


@pytest.mark.parametrize('form', match_distill.KD1_FORMS)
def test_gradient_descent_on_a_free_student_map(form):
  """A student softmax map follows each form's gradient from a uniform start."""
  teacher = jnp.asarray(np_softmax(RNG.normal(size=(12,))), jnp.float32)
  loss = lambda z: match_distill.map_distance(teacher, jax.nn.softmax(z), form)
  z = jnp.zeros(12)
  opt = optax.sgd(2.0)
  opt_state = opt.init(z)
  for _ in range(3000):
    updates, opt_state = opt.update(jax.grad(loss)(z), opt_state)
    z = optax.apply_updates(z, updates)
  student = np.asarray(jax.nn.softmax(z))
  if form == 'dot':
    assert student.max() > 0.9 and student.argmax() == int(jnp.argmax(teacher))
  else:
    np.testing.assert_allclose(student, teacher, atol=0.02)


def adapter_kd1_toy(form, steps, attention_div=0.0, div_form='dot', lr=0.02, seed=0):
  """The real TSAA on fixed random tokens, trained on L_kd1 alone (as in the issue),
  optionally with the attention diversity term (Eq. 5 on the self-refined maps).

  Each of 8 images has 32 tokens and 4 part queries; its partner is another
  image; the teacher is the partner's map under this image's queries (the
  cross-refinement, gradient stopped), the student the partner's own map (the
  self-refinement), matched by Eq. (17). Returns the attention statistics of
  the self-refined maps at the end.
  """
  rng = np.random.default_rng(seed)
  b, n, c, parts = 8, 32, 16, 4
  tokens = jnp.asarray(rng.normal(size=(b, n, c)), jnp.float32)
  queries = jnp.asarray(rng.normal(size=(b, parts, c)), jnp.float32)
  partner = jnp.asarray(np.roll(np.arange(b), 1))
  adapter = attention_adapter.AttentionAdapter(channels=c, hidden=32, dim=16, channel_reduction=4)
  params = adapter.init(jax.random.key(seed), tokens, queries, tokens)['params']

  def maps(params):
    def run(module):
      t_hat = module.encode_tokens(tokens)
      q_hat = module.encode_queries(queries, tokens)
      own = attention_adapter.spatial_similarity(q_hat, t_hat)
      cross = attention_adapter.spatial_similarity(q_hat, t_hat[partner])
      return cross, own

    return adapter.apply({'params': params}, method=run)

  def loss(params):
    cross, own = maps(params)
    teacher, student = jax.lax.stop_gradient(cross), own[partner]
    perm = match_distill.match_queries(match_distill.edge_weights(teacher, student))
    return match_distill.map_distill_loss(
      teacher, student, perm, form
    ) + attention_div * region_losses.attention_diversity_loss(own, div_form)

  opt = optax.sgd(lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = opt.update(jax.grad(loss)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return {k: float(v) for k, v in attention_adapter.attention_statistics(maps(params)[1]).items()}


def test_dot_form_collapses_the_real_adapter():
  start = adapter_kd1_toy('dot', 0)
  assert start['attention_max'] < 0.5 and start['attention_distinct'] > 2
  collapsed = adapter_kd1_toy('dot', 400)
  assert collapsed['attention_max'] > 0.95, collapsed
  assert collapsed['attention_distinct'] == 1.0, collapsed


def test_aligning_form_alone_makes_attention_query_independent():
  """KL is minimised by s = t, and the cheapest s = t is attention that ignores
  the query: every part of an image then peaks on one token."""
  aligned = adapter_kd1_toy('kl', 1500)
  assert aligned['attention_distinct'] < 1.5, aligned


@pytest.mark.parametrize('div_form', region_losses.ATTENTION_DIV_FORMS)
def test_attention_diversity_keeps_the_parts_apart(div_form):
  kept = adapter_kd1_toy('kl', 1500, attention_div=1.0, div_form=div_form)
  assert kept['attention_distinct'] > 2.5, kept
  if div_form == 'dot':  # Eq. (5)'s form is also smallest for uniform maps: they spread
    assert kept['attention_max'] < 0.2, kept


def test_attention_diversity_loss_against_numpy():
  sim = np_softmax(2 * RNG.normal(size=(3, 4, 9)))
  for div_form in region_losses.ATTENTION_DIV_FORMS:
    expected = []
    for maps in sim:
      if div_form == 'cosine':
        maps = maps / np.sqrt((maps**2).sum(-1, keepdims=True))
      expected.append(sum(float(maps[k] @ maps[m]) for k in range(4) for m in range(k + 1, 4)))
    got = region_losses.attention_diversity_loss(jnp.asarray(sim, jnp.float32), div_form)
    np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)
  uniform = jnp.full((1, 4, 8), 1 / 8)
  disjoint = jnp.asarray(np.eye(8)[None, :4])
  # 6 pairs: uniform maps are the most alike under the cosine, nearly free under Eq. (5)'s form.
  assert float(region_losses.attention_diversity_loss(uniform, 'cosine')) == pytest.approx(6.0)
  assert float(region_losses.attention_diversity_loss(uniform, 'dot')) == pytest.approx(6 / 8)
  for div_form in region_losses.ATTENTION_DIV_FORMS:
    assert float(region_losses.attention_diversity_loss(disjoint, div_form)) == 0.0
  with pytest.raises(ValueError, match='config.loss.attention_div_form'):
    region_losses.attention_diversity_loss(uniform, 'cos')


def np_attention_statistics(sim):
  b, k, n = sim.shape
  maxes, entropies, distinct = [], [], []
  for bi in range(b):
    peaks = set()
    for ki in range(k):
      row = sim[bi, ki]
      maxes.append(row.max())
      entropies.append(-sum(p * np.log(p) for p in row if p > 0))
      peaks.add(int(np.argmax(row)))
    distinct.append(len(peaks))
  return np.mean(maxes), np.mean(entropies), np.mean(distinct)


def test_attention_statistics_against_numpy_and_a_hand_case():
  sim = np_softmax(3 * RNG.normal(size=(5, 4, 10)))
  got = attention_adapter.attention_statistics(jnp.asarray(sim, jnp.float32))
  expected = np_attention_statistics(sim)
  np.testing.assert_allclose(
    [got['attention_max'], got['attention_entropy'], got['attention_distinct']], expected, rtol=1e-5
  )
  # Hand case: every part one-hot on token 0 -> max 1, entropy 0, one distinct peak.
  collapsed = np.zeros((2, 4, 6))
  collapsed[:, :, 0] = 1.0
  got = attention_adapter.attention_statistics(jnp.asarray(collapsed))
  assert (float(got['attention_max']), float(got['attention_distinct'])) == (1.0, 1.0)
  assert float(got['attention_entropy']) == pytest.approx(0.0, abs=1e-6)
  uniform = np.full((1, 3, 8), 1 / 8)
  got = attention_adapter.attention_statistics(jnp.asarray(uniform))
  assert float(got['attention_entropy']) == pytest.approx(np.log(8), rel=1e-6)


def objective_grads(outputs, weights, term):
  labels = jnp.array([0, 1, 0, 1])
  partner = jnp.array([2, 3, 0, 1])
  f = lambda o: cal_objective(o, labels, labels, partner, partner, weights)[1][term]
  return f(outputs), jax.grad(f)(outputs)


@pytest.mark.parametrize('term', ['kd1', 'kd2'])
def test_stop_teacher_gradient_switch(term):
  outputs = fake_outputs()
  teacher = {'kd1': ('sim_vi', 'sim_iv'), 'kd2': ('logits_vi', 'logits_iv')}[term]
  student = {'kd1': 'sim_vv', 'kd2': 'logits_vv'}[term]
  value, grads = objective_grads(outputs, loss_weights(), term)
  for name in teacher:
    np.testing.assert_array_equal(grads[name], 0.0)
  assert np.abs(grads[student]).sum() > 0
  value_free, grads_free = objective_grads(outputs, loss_weights(stop_teacher_gradient=False), term)
  assert float(value_free) == pytest.approx(float(value), rel=1e-6)  # the value is the same
  for name in teacher:
    assert np.abs(grads_free[name]).sum() > 0
  np.testing.assert_allclose(grads_free[student], grads[student], rtol=1e-5, atol=1e-8)


def test_kd1_form_switch_changes_kd1_only():
  outputs = fake_outputs()
  labels = jnp.array([0, 1, 0, 1])
  partner = jnp.array([2, 3, 0, 1])
  terms = {
    form: cal_objective(outputs, labels, labels, partner, partner, loss_weights(kd1_form=form))[1]
    for form in match_distill.KD1_FORMS
  }
  for form in ALIGNING_FORMS:
    assert float(terms[form]['kd1']) != pytest.approx(float(terms['dot']['kd1']))
    for name in ('id', 'global_id', 'pcl', 'kd2', 'dis', 'div'):
      assert float(terms[form][name]) == float(terms['dot'][name]), name


def test_query_matching_off_uses_the_identity_assignment():
  outputs = fake_outputs()
  labels = jnp.array([0, 1, 0, 1])
  partner = jnp.array([2, 3, 0, 1])
  _, terms, ir_to_vis = cal_objective(
    outputs, labels, labels, partner, partner, loss_weights(query_matching=False, kd1_form='dot')
  )
  np.testing.assert_array_equal(ir_to_vis, np.tile(np.arange(3), (8, 1)))
  teacher = np.concatenate([outputs['sim_vi'], outputs['sim_iv']])
  student = np.concatenate(
    [
      np.asarray(outputs['sim_vv'])[np.asarray(partner)],
      np.asarray(outputs['sim_ii'])[np.asarray(partner)],
    ]
  )
  expected = -np.mean(np.sum(teacher * student, axis=(1, 2)))  # identity pairs, dot form
  np.testing.assert_allclose(terms['kd1'], expected, rtol=1e-5)
  _, terms_matched, _ = cal_objective(
    outputs, labels, labels, partner, partner, loss_weights(kd1_form='dot')
  )
  assert float(terms_matched['kd1']) <= float(terms['kd1']) + 1e-7  # the optimum is no worse


def test_kd2_without_attention_gradient_leaves_the_tsaa_maps_to_the_other_losses():
  """config.loss.kd2_attention_gradient=False: the same forward pass (the students'
  copies equal the self-refined logits, the BNNeck's moments and the other outputs
  are unchanged), and L_kd2's gradient no longer reaches theta_1 and theta_2 (the
  MLPs of Eq. 10, which make S), while it still reaches the classifier as before."""
  from cal_jax.training.state import build_model
  from configs import tiny

  rng = np.random.default_rng(4)
  images_v = jnp.asarray(rng.normal(size=(4, 64, 32, 3)), jnp.float32)
  images_i = jnp.asarray(rng.normal(size=(4, 64, 32, 3)), jnp.float32)
  partner = jnp.array([1, 0, 3, 2])
  labels = jnp.array([0, 0, 1, 1])
  models = {}
  for flag in (True, False):
    config = tiny.get_config()
    config.loss.kd2_attention_gradient = flag
    models[flag] = build_model(config, 5)
  variables = models[True].init(jax.random.key(0), images_v, images_i, partner, partner)
  weights = loss_weights()

  def run(flag, params):
    outputs, _ = models[flag].apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      images_v,
      images_i,
      partner,
      partner,
      mutable=['batch_stats'],
    )
    return outputs

  with_grad, detached = run(True, variables['params']), run(False, variables['params'])
  for name in ('logits_vv', 'logits_ii', 'logits_vi', 'sim_vv', 'global_logits'):
    np.testing.assert_allclose(detached[name], with_grad[name], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    detached['logits_vv_kd2'], with_grad['logits_vv'], rtol=1e-5, atol=1e-6
  )
  assert 'logits_vv_kd2' not in with_grad

  def kd2_grads(flag):
    def kd2(params):
      outputs = run(flag, params)
      return cal_objective(outputs, labels, labels, partner, partner, weights)[1]['kd2']

    return jax.grad(kd2)(variables['params'])

  grads = {flag: kd2_grads(flag) for flag in (True, False)}
  for mlp in ('token_mlp', 'query_mlp'):
    moved = jax.tree_util.tree_leaves(grads[True]['adapter'][mlp])
    assert sum(float(jnp.abs(g).sum()) for g in moved) > 0
    for g in jax.tree_util.tree_leaves(grads[False]['adapter'][mlp]):
      np.testing.assert_array_equal(g, 0.0)
  np.testing.assert_allclose(
    grads[False]['part_classifier']['kernel'],
    grads[True]['part_classifier']['kernel'],
    rtol=1e-4,
    atol=1e-7,
  )
