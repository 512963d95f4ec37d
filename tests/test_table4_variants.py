"""Table 4's variants: LV and HS part queries, SD similarity, w/o CA, triplet and center loss.

Each against a plain numpy formulation written here, and each ablation row
checked to change the network or the objective in the way it names.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from loss_fakes import fake_outputs, loss_weights

from cal_jax.config import ablations
from cal_jax.evaluation import embedding as inference
from cal_jax.losses import metric_losses
from cal_jax.losses.objective import cal_objective
from cal_jax.models import attention_adapter, part_queries
from cal_jax.training.state import build_model
from configs import tiny

RNG = np.random.default_rng(4)


def np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------ HS ---


@pytest.mark.parametrize('height,stripes', [(8, 2), (8, 4), (8, 6), (5, 3), (3, 4)])
def test_horizontal_stripes_are_adaptive_average_pooling_over_rows(height, stripes):
  width, channels = 3, 5
  fmap = RNG.normal(size=(2, height, width, channels)).astype(np.float32)
  out = part_queries.HorizontalStripes(stripes).apply({}, jnp.asarray(fmap))
  for k in range(stripes):
    # torch.nn.AdaptiveAvgPool2d((n, 1)): rows floor(k h / n) .. ceil((k + 1) h / n) - 1.
    start, end = (k * height) // stripes, -((-(k + 1) * height) // stripes)
    expected = fmap[:, start:end].mean(axis=(1, 2))
    np.testing.assert_allclose(out['parts'][:, k], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out['selected']).sum(axis=1), 1.0, rtol=1e-6)


def test_six_stripes_of_eight_rows_overlap_by_a_row():
  w = np.asarray(part_queries.stripe_weights(8, 1, 6))  # tokens are rows here
  rows = [tuple(np.nonzero(w[:, k])[0]) for k in range(6)]
  assert rows == [(0, 1), (1, 2), (2, 3), (4, 5), (5, 6), (6, 7)]


# ------------------------------------------------------------------ LV ---


def test_learnable_queries_are_the_same_for_every_image():
  fmap = jnp.asarray(RNG.normal(size=(3, 4, 2, 6)), jnp.float32)
  module = part_queries.LearnableQueries(4)
  variables = module.init(jax.random.key(0), fmap)
  out = module.apply(variables, fmap)
  np.testing.assert_array_equal(out['parts'][0], variables['params']['vectors'])
  np.testing.assert_array_equal(out['parts'][2], variables['params']['vectors'])
  # An image that is different changes nothing about its queries.
  out2 = module.apply(variables, fmap * 3.0)
  np.testing.assert_array_equal(out['parts'], out2['parts'])


def test_m_hat_reorders_the_learned_vectors_of_the_visible_modality():
  config = ablations.apply(tiny.get_config(), ablations.ROWS['drm_lv'])
  model = build_model(config, 5)
  images = jnp.asarray(RNG.uniform(size=(2, 64, 32, 3)), jnp.float32)
  variables = model.init(
    jax.random.key(1), images, images, jnp.array([1, 0]), jnp.array([1, 0]), train=False
  )
  order = np.array([2, 0, 3, 1])
  reordered = {
    'params': inference.reorder_prototypes(variables['params'], order),
    'batch_stats': variables['batch_stats'],
  }
  embed = lambda v, m: np.asarray(model.apply(v, images, m, method=type(model).embed)).reshape(
    2, 4, -1
  )
  np.testing.assert_allclose(embed(reordered, 0), embed(variables, 0)[:, order], atol=1e-6)
  np.testing.assert_allclose(embed(reordered, 1), embed(variables, 1), atol=1e-6)


# ------------------------------------------------------------- SD, CA ---


def test_scaled_dot_similarity_is_eq6_on_the_raw_features():
  b, n, k, c = 2, 7, 3, 12
  tokens = RNG.normal(size=(b, n, c)).astype(np.float32)
  parts = RNG.normal(size=(b, k, c)).astype(np.float32)
  adapter = attention_adapter.AttentionAdapter(c, 8, 4, 4, similarity='scaled_dot')
  variables = adapter.init(jax.random.key(0), tokens, parts, tokens)
  refined, sim = adapter.apply(variables, tokens, parts, tokens)
  expected_sim = np_softmax(np.einsum('bkc,bnc->bkn', parts, tokens) / math.sqrt(c))
  np.testing.assert_allclose(sim, expected_sim, rtol=1e-5, atol=1e-6)
  gates = 1 / (1 + np.exp(-adapter.apply(variables, parts, method=lambda m, p: m.channel_mlp(p))))
  np.testing.assert_allclose(
    refined, np.einsum('bkn,bnc->bkc', expected_sim, tokens) * gates, rtol=1e-5, atol=1e-6
  )
  # No IN and no MLPs theta_1, theta_2 in Eq. (6): only theta_3 has parameters.
  assert set(variables['params']) == {'channel_mlp'}


def test_without_channel_attention_the_refinement_is_the_attended_tokens():
  b, n, k, c = 2, 5, 3, 8
  tokens = RNG.normal(size=(b, n, c)).astype(np.float32)
  parts = RNG.normal(size=(b, k, c)).astype(np.float32)
  adapter = attention_adapter.AttentionAdapter(c, 8, 4, 4, channel_attention=False)
  variables = adapter.init(jax.random.key(0), tokens, parts, tokens)
  refined, sim = adapter.apply(variables, tokens, parts, tokens)
  np.testing.assert_allclose(
    refined, np.einsum('bkn,bnc->bkc', np.asarray(sim), tokens), rtol=1e-5, atol=1e-6
  )
  assert 'channel_mlp' not in variables['params']


# --------------------------------------------------- triplet and center ---


def np_part_distance(a, b):
  return np.mean(np.sqrt(np.sum((a - b) ** 2, axis=-1) + 1e-12), axis=-1)


def test_batch_hard_triplet_loss_against_a_loop():
  features = RNG.normal(size=(8, 3, 5)).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
  unit = np_unit(features.astype(np.float64))
  losses = []
  for i in range(8):
    pos = [np_part_distance(unit[i], unit[j]) for j in range(8) if labels[j] == labels[i]]
    neg = [np_part_distance(unit[i], unit[j]) for j in range(8) if labels[j] != labels[i]]
    losses.append(max(0.0, 0.3 + max(pos) - min(neg)))
  got = metric_losses.batch_hard_triplet_loss(jnp.asarray(features), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), np.mean(losses), rtol=1e-5)


def test_center_loss_against_numpy():
  features = RNG.normal(size=(6, 2, 4)).astype(np.float32)
  centers = RNG.normal(size=(3, 2, 4)).astype(np.float32)
  labels = np.array([2, 0, 1, 1, 0, 2])
  expected = np.mean(
    [
      0.5 * np.sum((np_unit(features[i, p]) - centers[labels[i], p]) ** 2)
      for i in range(6)
      for p in range(2)
    ]
  )
  got = metric_losses.center_loss(jnp.asarray(features), jnp.asarray(labels), jnp.asarray(centers))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize('form', ['triplet', 'center'])
def test_pcl_form_replaces_only_the_pcl_term(form):
  outputs = fake_outputs()
  outputs['class_centers'] = jnp.asarray(RNG.normal(size=(5, 3, 8)), jnp.float32)
  labels, partner = jnp.array([0, 1, 0, 1]), jnp.array([2, 3, 0, 1])
  base = loss_weights()
  _, terms, _ = cal_objective(outputs, labels, labels, partner, partner, base)
  _, terms_row, _ = cal_objective(
    outputs, labels, labels, partner, partner, loss_weights(pcl_form=form)
  )
  for name in terms:
    if name not in ('pcl', 'loss'):
      assert float(terms_row[name]) == float(terms[name]), name
  assert float(terms_row['pcl']) != float(terms['pcl'])
  both = lambda k: jnp.concatenate([outputs[f'f_{k}'] for k in k])
  if form == 'triplet':
    expected = metric_losses.batch_hard_triplet_loss(
      both(('vv', 'ii')), jnp.concatenate([labels, labels])
    )
  else:
    expected = metric_losses.center_loss(
      both(('vv', 'ii', 'vi', 'iv')), jnp.concatenate([labels] * 4), outputs['class_centers']
    )
  np.testing.assert_allclose(float(terms_row['pcl']), float(expected), rtol=1e-6)


# ------------------------------------------------- the rows themselves ---


def param_paths(config, image_size=(64, 32)):
  model = build_model(config, 5)
  images = jnp.zeros((2, *image_size, 3))
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), images, images, jnp.array([1, 0]), jnp.array([1, 0]))
  )
  return {
    '/'.join(str(getattr(k, 'key', k)) for k in path)
    for path, _ in jax.tree_util.tree_flatten_with_path(shapes['params'])[0]
  }


def test_each_table4_row_changes_the_network_as_it_names():
  base = param_paths(tiny.get_config())
  rows = {
    name: param_paths(ablations.apply(tiny.get_config(), ablations.ROWS[name]))
    for name in (
      'drm_lv',
      'drm_hs_4',
      'tsaa_sd',
      'tsaa_sd_no_ca',
      'pcl_center',
      'pcl_triplet',
      'pcl_ica_cca',
    )
  }
  drm = {p for p in base if p.startswith('region_mining_')}
  assert drm and not drm & rows['drm_lv'] and not drm & rows['drm_hs_4']
  assert rows['drm_lv'] - base == {
    'region_mining_visible/vectors',
    'region_mining_infrared/vectors',
  }
  assert rows['drm_hs_4'] == base - drm  # stripes have no parameters
  mlps = {p for p in base if p.startswith(('adapter/token_mlp', 'adapter/query_mlp'))}
  assert mlps and rows['tsaa_sd'] == base - mlps
  gates = {p for p in base if p.startswith('adapter/channel_mlp')}
  assert gates and rows['tsaa_sd_no_ca'] == base - mlps - gates
  assert rows['pcl_center'] == base | {'class_centers'}
  assert rows['pcl_triplet'] == base
  assert rows['pcl_ica_cca'] == base | {'class_centers', 'camera_centers'}


@pytest.mark.parametrize('name', ['drm_lv', 'drm_hs_6'])
def test_lv_and_hs_rows_train_without_the_drm_losses(name):
  config = ablations.apply(tiny.get_config(), ablations.ROWS[name])
  model = build_model(config, 5)
  images = jnp.asarray(RNG.uniform(size=(4, 64, 32, 3)), jnp.float32)
  labels, partner = jnp.array([0, 1, 0, 1]), jnp.array([2, 3, 0, 1])
  variables = model.init(jax.random.key(0), images, images, partner, partner)
  outputs, _ = model.apply(variables, images, images, partner, partner, mutable=['batch_stats'])
  assert 'part_logits_vis' not in outputs
  assert outputs['sim_vv'].shape[1] == config.model.num_parts
  total, terms, _ = cal_objective(outputs, labels, labels, partner, partner, config.loss)
  assert float(terms['dis']) == 0.0 and float(terms['div']) == 0.0
  assert np.isfinite(float(total))


@pytest.mark.parametrize(
  'name',
  [
    'drm_lv',
    'drm_hs_2',
    'tsaa_sd',
    'tsaa_sd_no_ca',
    'tsaa_cosine',
    'tsaa_no_border',
    'tsaa_centred',
  ],
)
def test_table4_network_variants_are_not_exported_to_pytorch(name):
  from cal_jax.interop import torch_mapping

  config = ablations.apply(tiny.get_config(), ablations.ROWS[name])
  with pytest.raises(ValueError, match='is an ablation variant'):
    torch_mapping.model_hyperparameters(config)
  assert torch_mapping.model_hyperparameters(tiny.get_config())['num_parts'] == 4


def test_cosine_similarity_is_a_scaled_softmax_of_cosines():
  b, n, k, c = 2, 7, 3, 12
  tokens = RNG.normal(size=(b, n, c)).astype(np.float32)
  parts = RNG.normal(size=(b, k, c)).astype(np.float32)
  adapter = attention_adapter.AttentionAdapter(c, 8, 4, 4, similarity='cosine')
  variables = adapter.init(jax.random.key(0), tokens, parts, tokens)
  assert float(variables['params']['cosine_scale']) == attention_adapter.COSINE_SCALE
  _, sim = adapter.apply(variables, tokens, parts, tokens)
  t_hat = np.asarray(
    adapter.apply(
      variables, tokens, method=lambda m, t: m.token_mlp(attention_adapter.instance_normalize(t, t))
    )
  )
  p_hat = np.asarray(
    adapter.apply(
      variables,
      parts,
      tokens,
      method=lambda m, p, t: m.query_mlp(attention_adapter.instance_normalize(p, t)),
    )
  )
  # A vector of zeros (every hidden ReLU off) has cosine 0, as l2_normalize's floor gives.
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  cos = np.einsum('bkd,bnd->bkn', unit(p_hat), unit(t_hat))
  np.testing.assert_allclose(
    sim, np_softmax(attention_adapter.COSINE_SCALE * cos), rtol=1e-4, atol=1e-6
  )


def test_interior_tokens_leave_out_the_map_edge():
  mask = np.asarray(attention_adapter.interior_tokens(6, 4, 1)).reshape(6, 4)
  expected = np.zeros((6, 4), bool)
  expected[1:5, 1:3] = True
  np.testing.assert_array_equal(mask, expected)
  assert attention_adapter.interior_tokens(6, 4, 0) is None
  with pytest.raises(ValueError, match='attention_border=2 leaves no token of the 6x4'):
    attention_adapter.interior_tokens(6, 4, 2)


def test_border_tokens_get_no_attention_and_the_rest_is_eq9_renormalised():
  b, k, c, height, width = 2, 3, 12, 6, 4
  tokens = RNG.normal(size=(b, height * width, c)).astype(np.float32)
  parts = RNG.normal(size=(b, k, c)).astype(np.float32)
  adapter = attention_adapter.AttentionAdapter(c, 8, 4, 4)
  variables = adapter.init(jax.random.key(0), tokens, parts, tokens)
  mask = attention_adapter.interior_tokens(height, width, 1)
  refined, sim = adapter.apply(variables, tokens, parts, tokens, mask)
  _, full = adapter.apply(variables, tokens, parts, tokens)
  # Eq. (9) over the interior only: the full map's values there, renormalised.
  kept = np.asarray(mask)
  expected = np.where(kept, np.asarray(full), 0.0)
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(sim, expected, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(sim)[..., ~kept] == 0.0)
  gates = 1 / (1 + np.exp(-adapter.apply(variables, parts, method=lambda m, p: m.channel_mlp(p))))
  np.testing.assert_allclose(
    refined, np.einsum('bkn,bnc->bkc', expected, tokens) * gates, rtol=1e-5, atol=1e-6
  )


def test_no_border_row_masks_every_refinement_and_changes_no_parameter():
  config = ablations.apply(tiny.get_config(), ablations.ROWS['tsaa_no_border'])
  assert param_paths(config, (128, 64)) == param_paths(tiny.get_config(), (128, 64))
  model, base = build_model(config, 5), build_model(tiny.get_config(), 5)
  images = jnp.asarray(RNG.uniform(size=(4, 128, 64, 3)), jnp.float32)
  partner = jnp.array([2, 3, 0, 1])
  variables = base.init(jax.random.key(0), images, images, partner, partner)
  outputs, _ = model.apply(variables, images, images, partner, partner, mutable=['batch_stats'])
  plain, _ = base.apply(variables, images, images, partner, partner, mutable=['batch_stats'])
  height, width = 8, 4  # 128x64 at the backbone's stride 16
  edge = ~np.asarray(attention_adapter.interior_tokens(height, width, 1))
  for name in ('sim_vv', 'sim_ii', 'sim_vi', 'sim_iv'):
    assert outputs[name].shape[-1] == height * width
    assert np.all(np.asarray(outputs[name])[..., edge] == 0.0), name
    assert np.asarray(plain[name])[..., edge].min() > 0.0, name
  np.testing.assert_allclose(outputs['global_logits'], plain['global_logits'], rtol=1e-6)
  maps = model.apply(variables, images, 0, method=model.part_maps)['attention']
  assert maps.shape[-2:] == (height, width)
  np.testing.assert_array_equal(np.asarray(maps)[..., edge.reshape(height, width)], 0.0)


# ------------------------------------------------- positional centring ---


def np_instance_normalize(x):
  mean = x.mean(axis=1, keepdims=True)
  return (x - mean) / np.sqrt(
    x.var(axis=1, keepdims=True) + attention_adapter.INSTANCE_NORM_EPSILON
  )


def np_mlp(params, x):
  hidden = np.maximum(
    x @ np.asarray(params['fc1']['kernel']) + np.asarray(params['fc1']['bias']), 0
  )
  return hidden @ np.asarray(params['fc2']['kernel']) + np.asarray(params['fc2']['bias'])


def test_position_centring_subtracts_the_batch_mean_and_keeps_a_running_one():
  x1 = RNG.normal(size=(3, 5, 2)).astype(np.float32)
  x2 = RNG.normal(size=(4, 5, 2)).astype(np.float32) + 1.0
  module = attention_adapter.PositionCentring(momentum=0.1)
  variables = module.init(jax.random.key(0), x1, True)
  np.testing.assert_array_equal(variables['batch_stats']['mean'], np.zeros((5, 2)))
  out, updated = module.apply(variables, x1, True, mutable=['batch_stats'])
  np.testing.assert_allclose(out, x1 - x1.mean(0), atol=1e-6)
  running = 0.1 * x1.mean(0)
  np.testing.assert_allclose(updated['batch_stats']['mean'], running, atol=1e-6)
  _, updated = module.apply(updated, x2, True, mutable=['batch_stats'])
  running = 0.9 * running + 0.1 * x2.mean(0)
  np.testing.assert_allclose(updated['batch_stats']['mean'], running, atol=1e-6)
  # Evaluation: the running mean, whatever the batch.
  np.testing.assert_allclose(module.apply(updated, x1, False), x1 - running, atol=1e-6)


def test_centred_keys_are_eq10_on_in_t_less_its_mean_over_images():
  b, n, k, c = 3, 6, 2, 10
  tokens = RNG.normal(size=(b, n, c)).astype(np.float32)
  parts = RNG.normal(size=(b, k, c)).astype(np.float32)
  adapter = attention_adapter.AttentionAdapter(c, 8, 4, 4, centring=True)
  plain = attention_adapter.AttentionAdapter(c, 8, 4, 4)
  variables = adapter.init(jax.random.key(0), tokens, parts, tokens)
  (refined, sim), _ = adapter.apply(
    variables, tokens, parts, tokens, None, True, mutable=['batch_stats']
  )
  params = variables['params']
  normalized = np_instance_normalize(tokens)
  t_hat = np_mlp(params['token_mlp'], normalized - normalized.mean(axis=0))
  p_hat = np_mlp(
    params['query_mlp'],
    (parts - tokens.mean(1, keepdims=True))
    / np.sqrt(tokens.var(1, keepdims=True) + attention_adapter.INSTANCE_NORM_EPSILON),
  )
  expected = np_softmax(np.einsum('bkd,bnd->bkn', p_hat, t_hat) / np.sqrt(4.0))
  np.testing.assert_allclose(sim, expected, rtol=1e-4, atol=1e-6)
  # The same parameters without centring: Eq. (10) on IN(T) itself, a different map.
  _, plain_sim = plain.apply({'params': params}, tokens, parts, tokens)
  t_hat_plain = np_mlp(params['token_mlp'], normalized)
  np.testing.assert_allclose(
    plain_sim,
    np_softmax(np.einsum('bkd,bnd->bkn', p_hat, t_hat_plain) / np.sqrt(4.0)),
    rtol=1e-4,
    atol=1e-6,
  )
  assert np.abs(np.asarray(sim) - np.asarray(plain_sim)).max() > 1e-3


def test_centred_attention_of_identical_images_ignores_the_query():
  """A batch of one image repeated: every centred key is M(0), so S is uniform (1/N)."""
  b, n, k, c = 4, 8, 3, 10
  tokens = np.repeat(RNG.normal(size=(1, n, c)).astype(np.float32), b, axis=0)
  parts = RNG.normal(size=(b, k, c)).astype(np.float32)
  adapter = attention_adapter.AttentionAdapter(c, 8, 4, 4, centring=True)
  variables = adapter.init(jax.random.key(1), tokens, parts, tokens)
  (_, sim), _ = adapter.apply(variables, tokens, parts, tokens, None, True, mutable=['batch_stats'])
  np.testing.assert_allclose(sim, np.full((b, k, n), 1.0 / n), rtol=1e-5)
  _, plain = attention_adapter.AttentionAdapter(c, 8, 4, 4).apply(
    {'params': variables['params']}, tokens, parts, tokens
  )
  assert np.asarray(plain).max() > 2.0 / n  # without centring, the query picks tokens


def test_centred_row_changes_only_the_keys_and_evaluates_with_the_running_mean():
  config = ablations.apply(tiny.get_config(), ablations.ROWS['tsaa_centred'])
  assert config.model.attention_centring and not tiny.get_config().model.attention_centring
  assert param_paths(config, (128, 64)) == param_paths(tiny.get_config(), (128, 64))
  model, base = build_model(config, 5), build_model(tiny.get_config(), 5)
  images = jnp.asarray(RNG.uniform(size=(4, 128, 64, 3)), jnp.float32)
  partner = jnp.array([2, 3, 0, 1])
  variables = model.init(jax.random.key(0), images, images, partner, partner)
  running = variables['batch_stats']['adapter']['position_centring']['mean']
  assert running.shape == (8 * 4, config.model.width * 8 * 4)  # 128x64 at stride 16, C
  plain_variables = {
    'params': variables['params'],
    'batch_stats': {k: v for k, v in variables['batch_stats'].items() if k != 'adapter'},
  }
  outputs, stats = model.apply(variables, images, images, partner, partner, mutable=['batch_stats'])
  plain, _ = base.apply(plain_variables, images, images, partner, partner, mutable=['batch_stats'])
  np.testing.assert_allclose(outputs['global_logits'], plain['global_logits'], rtol=1e-6)
  assert np.abs(np.asarray(outputs['sim_vv']) - np.asarray(plain['sim_vv'])).max() > 1e-4
  updated = stats['batch_stats']['adapter']['position_centring']['mean']
  assert np.abs(np.asarray(updated)).max() > 0  # the training pass moved the running mean
  # Evaluation reads the running mean: at zero it is the plain model's attention.
  at_zero = model.apply(variables, images, 0, method=model.part_maps)['attention']
  np.testing.assert_allclose(
    at_zero, base.apply(plain_variables, images, 0, method=base.part_maps)['attention'], rtol=1e-5
  )
  moved = dict(variables, batch_stats=stats['batch_stats'])
  after = model.apply(moved, images, 0, method=model.part_maps)['attention']
  assert np.abs(np.asarray(after) - np.asarray(at_zero)).max() > 1e-4


# ------------------------------------------------ per-part classifiers ---


def test_per_part_classifiers_classify_each_refinement_by_its_queries_classifier():
  config = ablations.apply(tiny.get_config(), ablations.ROWS['part_classifiers'])
  assert config.model.id_classifier == 'per_part'
  model, base = build_model(config, 5), build_model(tiny.get_config(), 5)
  images = jnp.asarray(RNG.uniform(size=(4, 128, 64, 3)), jnp.float32)
  partner = jnp.array([2, 3, 0, 1])
  variables = base.init(jax.random.key(0), images, images, partner, partner)
  params = dict(variables['params'])
  shared = params.pop('part_classifier')['kernel']  # [C, K]
  assert set(param_paths(config, (128, 64))) == (
    set(param_paths(tiny.get_config(), (128, 64))) - {'part_classifier/kernel'}
  ) | {'part_classifiers'}
  # Every classifier the shared one: the shared model's logits.
  kernels = np.broadcast_to(np.asarray(shared), (2, 4, *shared.shape)).copy()
  per_part = dict(variables, params=params | {'part_classifiers': jnp.asarray(kernels)})
  run = lambda m, v: m.apply(v, images, images, partner, partner, mutable=['batch_stats'])[0]
  plain, outputs = run(base, variables), run(model, per_part)
  names = ('logits_vv', 'logits_ii', 'logits_vi', 'logits_iv', 'logits_vv_kd2', 'logits_ii_kd2')
  for name in names:
    np.testing.assert_allclose(outputs[name], plain[name], rtol=1e-5, atol=1e-7)
  # Infrared part 2's classifier moved: only the parts refined with infrared query 2 change.
  kernels[1, 2] += RNG.normal(size=shared.shape).astype(np.float32)
  moved = run(model, dict(variables, params=params | {'part_classifiers': jnp.asarray(kernels)}))
  for name in names:
    changed = np.abs(np.asarray(moved[name]) - np.asarray(outputs[name])).max(axis=(0, 2)) > 1e-6
    infrared_query = name in ('logits_ii', 'logits_vi', 'logits_ii_kd2')
    np.testing.assert_array_equal(changed, [False, False, infrared_query, False], err_msg=name)


# ---------------------------------------------------------- ICA & CCA ---


def mcca_numpy(features, labels, centers, rho, sigma):
  """MCLNet's MCCA loss written out with loops, per part, then averaged over parts."""
  batch, parts, _ = features.shape
  values = []
  for p in range(parts):
    x = np.stack([np_unit(features[i, p]) for i in range(batch)])
    c = centers[:, p]
    d = np.array([np.sum((x[i] - c[labels[i]]) ** 2) for i in range(batch)])
    others = [
      min(np.sum((c[labels[i]] - c[k]) ** 2) for k in range(len(c)) if k != labels[i])
      for i in range(batch)
    ]
    push = max(rho - sum(others) / batch, 0.0)
    nearest = 0.0
    for k in set(labels.tolist()):
      members = [i for i in range(batch) if labels[i] == k]
      nearest += len(members) * min(d[i] for i in members)
    pull = max(d.sum() / batch - nearest / batch - sigma, 0.0)
    values.append(pull + push)
  return float(np.mean(values))


@pytest.mark.parametrize('rho, sigma', [(2.0, 0.0036), (0.5, 0.2), (100.0, 0.0)])
def test_mcca_loss_against_numpy(rho, sigma):
  features = RNG.normal(size=(8, 3, 5)).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 1, 3, 3, 2])
  centers = RNG.normal(size=(4, 3, 5)).astype(np.float32)
  expected = mcca_numpy(features, labels, centers, rho, sigma)
  got = metric_losses.mcca_loss(
    jnp.asarray(features), jnp.asarray(labels), jnp.asarray(centers), rho, sigma
  )
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_mcca_loss_over_two_devices_is_the_global_batch():
  """A class (a camera) spans devices: its nearest sample and the means are global."""
  features = RNG.normal(size=(8, 2, 5)).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2, 2, 0])  # every class on both halves
  centers = RNG.normal(size=(3, 2, 5)).astype(np.float32)

  def per_device(f, y):
    # As the train step: each device differentiates its own copy of the loss, and the
    # gradients are averaged over the devices (the pmean of the parameters' gradients).
    loss = lambda f: metric_losses.mcca_loss(f, y, jnp.asarray(centers), 2.0, 0.01, 'batch')
    return loss(f), jax.grad(loss)(f) / 2

  value, grad = jax.pmap(per_device, axis_name='batch')(
    jnp.asarray(features).reshape(2, 4, 2, 5), jnp.asarray(labels).reshape(2, 4)
  )
  whole = lambda f: metric_losses.mcca_loss(f, jnp.asarray(labels), jnp.asarray(centers), 2.0, 0.01)
  np.testing.assert_allclose(np.asarray(value), float(whole(jnp.asarray(features))), rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(grad).reshape(features.shape),
    np.asarray(jax.grad(whole)(jnp.asarray(features))),
    rtol=1e-4,
    atol=1e-7,
  )


def test_ica_cca_replaces_only_the_pcl_term_and_needs_cameras():
  outputs = fake_outputs()
  outputs['class_centers'] = jnp.asarray(RNG.normal(size=(5, 3, 8)), jnp.float32)
  outputs['camera_centers'] = jnp.asarray(RNG.normal(size=(6, 3, 8)), jnp.float32)
  labels, partner = jnp.array([0, 1, 0, 1]), jnp.array([2, 3, 0, 1])
  cameras = (jnp.array([0, 1, 2, 3]), jnp.array([4, 5, 4, 5]))
  weights = loss_weights(pcl_form='ica_cca', mcca_rho=2.0, mcca_sigma=0.0036)
  _, terms, _ = cal_objective(outputs, labels, labels, partner, partner, loss_weights())
  _, terms_row, _ = cal_objective(
    outputs, labels, labels, partner, partner, weights, cameras=cameras
  )
  for name in terms:
    if name not in ('pcl', 'loss'):
      assert float(terms_row[name]) == float(terms[name]), name
  selfs = jnp.concatenate([outputs['f_vv'], outputs['f_ii']])
  expected = mcca_numpy(
    np.asarray(selfs),
    np.concatenate([labels] * 2),
    np.asarray(outputs['class_centers']),
    2.0,
    0.0036,
  ) + mcca_numpy(
    np.asarray(selfs),
    np.concatenate(cameras),
    np.asarray(outputs['camera_centers']),
    2.0,
    0.0036,
  )
  np.testing.assert_allclose(float(terms_row['pcl']), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="'camera'"):
    cal_objective(outputs, labels, labels, partner, partner, weights)


def test_ica_cca_row_trains_its_centres_in_the_pmapped_step(tiny_config):
  """The row end to end in the train step: camera centres exist (6 for SYSU-MM01), the
  loss is finite, and both kinds of centre receive a gradient."""
  from conftest import NUM_CLASSES, make_identity_batch

  from cal_jax.runtime import distributed as parallel
  from cal_jax.training import state as train_state
  from cal_jax.training.step import make_p_train_step

  config = ablations.apply(tiny_config.copy_and_resolve_references(), ablations.ROWS['pcl_ica_cca'])
  model = build_model(config, NUM_CLASSES, axis_name='batch')
  assert model.camera_centers == 6
  state = train_state.create_train_state(model, config, jax.random.key(0), steps_per_epoch=4)
  batch = make_identity_batch(config, devices=2, seed=3)
  batch['camera'] = np.where(batch['modality'] == 0, 1, 4).astype(np.int32)
  key = parallel.replicate(jax.random.key_data(jax.random.key(1)))
  new, metrics = make_p_train_step(config)(parallel.replicate(state), batch, key)
  assert np.isfinite(np.asarray(metrics['pcl'])).all() and float(metrics['pcl'][0]) > 0
  new = parallel.unreplicate(new)
  for name in ('class_centers', 'camera_centers'):
    assert not np.array_equal(np.asarray(new.params[name]), np.asarray(state.params[name])), name
