"""Sec. 3.4: the embedding, the part-cosine similarity, M-hat and prototype reordering."""

import itertools

import numpy as np
import pytest
from conftest import NUM_CLASSES

from cal_jax.evaluation import embedding as inference
from cal_jax.models.cal import CAL, INFRARED, VISIBLE
from cal_jax.training.state import build_model


@pytest.fixture(scope='module')
def eval_setup(tiny_config, tiny_state):
  model = build_model(tiny_config, NUM_CLASSES)
  variables = {'params': tiny_state.params, 'batch_stats': tiny_state.batch_stats}
  rng = np.random.default_rng(0)
  shape = (3, tiny_config.data.image_height, tiny_config.data.image_width, 3)
  return (
    model,
    variables,
    rng.normal(size=shape).astype(np.float32),
    rng.normal(size=shape).astype(np.float32),
  )


def test_similarity_is_the_sum_over_parts_of_cosines(eval_setup):
  model, variables, images_v, images_i = eval_setup
  e_v = np.asarray(inference.embed(model, variables, images_v, VISIBLE))
  e_i = np.asarray(inference.embed(model, variables, images_i, INFRARED))
  parts = model.num_parts
  assert e_v.shape == (3, parts * 8 * 8 * 4)
  # Independent: self-refined features, the BNNeck in eval mode by hand, cosine per part.
  stats = variables['batch_stats']['part_neck']
  scale = np.asarray(variables['params']['part_neck']['scale'])

  def neck(features):
    return (features - stats['mean']) / np.sqrt(stats['var'] + 1e-5) * scale

  f_v = neck(
    np.asarray(model.apply(variables, images_v, VISIBLE, method=CAL.refined_parts)['features'])
  )
  f_i = neck(
    np.asarray(model.apply(variables, images_i, INFRARED, method=CAL.refined_parts)['features'])
  )
  expected = np.zeros((3, 3))
  for a, b, p in itertools.product(range(3), range(3), range(parts)):
    expected[a, b] += f_v[a, p] @ f_i[b, p] / np.linalg.norm(f_v[a, p]) / np.linalg.norm(f_i[b, p])
  np.testing.assert_allclose(
    inference.part_cosine_similarity(e_v, e_i), expected, rtol=1e-4, atol=1e-5
  )


def test_reordering_prototypes_permutes_the_visible_parts_only(eval_setup):
  model, variables, images_v, images_i = eval_setup
  m_hat = np.array([2, 0, 3, 1])
  reordered = {
    'params': inference.reorder_prototypes(variables['params'], m_hat),
    'batch_stats': variables['batch_stats'],
  }
  parts = model.num_parts
  before = np.asarray(inference.embed(model, variables, images_v, VISIBLE)).reshape(3, parts, -1)
  after = np.asarray(inference.embed(model, reordered, images_v, VISIBLE)).reshape(3, parts, -1)
  np.testing.assert_allclose(after, before[:, m_hat], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(
    inference.embed(model, reordered, images_i, INFRARED),
    inference.embed(model, variables, images_i, INFRARED),
  )


def test_reorder_refuses_a_non_permutation(eval_setup):
  _, variables, _, _ = eval_setup
  with pytest.raises(ValueError, match='not a permutation'):
    inference.reorder_prototypes(variables['params'], np.array([0, 0, 1, 2]))


def test_global_embedding_of_the_baseline(eval_setup):
  model, variables, images_v, _ = eval_setup
  emb = np.asarray(inference.embed(model, variables, images_v, VISIBLE, 'global'))
  assert emb.shape == (3, 8 * 8 * 4)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match='config.model.embedding'):
    inference.embed(model, variables, images_v, VISIBLE, 'pooled')


def test_part_maps_are_the_drm_selection_and_the_tsaa_attention(eval_setup, tiny_config):
  """What the pictures draw (Fig. 4): S_hat keeps N_k tokens per part, S sums to 1."""
  from cal_jax.models import region_mining

  model, variables, images_v, _ = eval_setup
  maps = inference.part_maps(model, variables, images_v, VISIBLE)
  parts = model.apply(variables, images_v, VISIBLE, method=CAL.refined_parts)
  batch, num_parts, height, width = maps['selected'].shape
  assert (batch, num_parts) == (3, tiny_config.model.num_parts)
  assert (height, width) == (
    tiny_config.data.image_height // 16,
    tiny_config.data.image_width // 16,
  )
  # jit (part_maps) and op-by-op (refined_parts) differ by float rounding only.
  np.testing.assert_allclose(
    np.asarray(maps['selected']).reshape(batch, num_parts, -1),
    np.swapaxes(np.asarray(parts['selected']), 1, 2),
    rtol=1e-4,  # 1.4e-5 seen on another x86 CPU: rounding of the fused jit
    atol=1e-6,
  )
  np.testing.assert_allclose(
    np.asarray(maps['attention']).reshape(batch, num_parts, -1),
    np.asarray(parts['similarity']),
    rtol=1e-5,
    atol=1e-7,
  )
  n_k = region_mining.num_selected_tokens(height * width, num_parts, tiny_config.model.select_ratio)
  assert (np.count_nonzero(np.asarray(maps['selected']), axis=(2, 3)) == n_k).all()
  np.testing.assert_allclose(np.asarray(maps['attention']).sum(axis=(2, 3)), 1.0, rtol=1e-5)


def test_evaluation_on_two_devices_equals_one_device(tiny_run):
  """The evaluator embeds data-parallel over the local devices (two fake CPUs here):
  the same features and results as on one device."""
  import jax

  from cal_jax.evaluation import evaluator
  from cal_jax.evaluation import run as run_lib
  from cal_jax.training import restore

  config, workdir = tiny_run
  assert jax.local_device_count() == 2
  trained = restore.restore_trained(config, workdir)
  settings = evaluator.EvalSettings.from_config(config)
  out = {}
  for devices in (True, False):
    embedder = run_lib.make_embedder(
      trained.model, trained.state, trained.counts.m_hat(), devices=devices
    )
    assert embedder.local_devices == (2 if devices else None)
    out[devices] = evaluator.evaluate(
      embedder,
      trained.splits.test,
      trained.splits.name,
      settings,
      local_devices=embedder.local_devices,
      log=lambda _: None,
    )
  np.testing.assert_array_equal(out[True].row_of, out[False].row_of)
  np.testing.assert_allclose(out[True].features, out[False].features, rtol=1e-5, atol=1e-6)
  for key, result in out[False].results.items():
    for name in ('R1', 'R10', 'mAP', 'mINP'):
      assert out[True].results[key][name] == pytest.approx(result[name], abs=1e-9), (key, name)
