"""The pmapped CAL train step on the tiny config, over two fake CPU devices."""

import jax
import numpy as np
from conftest import make_identity_batch

from cal_jax.runtime import distributed as parallel
from cal_jax.training.step import make_p_train_step

# Written out here, not imported: the logged terms are checked against the paper's list.
EQ20_TERMS = ('id', 'global_id', 'pcl', 'kd1', 'kd2', 'dis', 'div')  # global_id: the baseline's
NOT_IN_THE_PAPER = ('attention_div', 'attention_guidance')
LOSS_TERMS = ('loss',) + EQ20_TERMS + NOT_IN_THE_PAPER
ATTENTION = ('attention_max', 'attention_entropy', 'attention_distinct')


def run_steps(p_step, state, batches, devices=None):
  replicated = parallel.replicate(state, devices)
  key = parallel.replicate(jax.random.key_data(jax.random.key(7)), devices)
  history = []
  for batch in batches:
    replicated, metrics = p_step(replicated, batch, key)
    history.append(jax.tree_util.tree_map(lambda x: np.asarray(x[0]), metrics))
  return parallel.unreplicate(replicated), history


def test_two_devices_are_used():
  assert jax.local_device_count() == 2


def test_one_step_every_loss_finite_and_every_parameter_updated(
  tiny_config, tiny_state, p_train_step
):
  batch = make_identity_batch(tiny_config, devices=2)
  new_state, (metrics,) = run_steps(p_train_step, tiny_state, [batch])
  for term in LOSS_TERMS:
    assert np.isfinite(metrics[term]), term
  tokens = (tiny_config.data.image_height // 16) * (tiny_config.data.image_width // 16)
  assert 1 / tokens <= metrics['attention_max'] <= 1
  assert 0 <= metrics['attention_entropy'] <= np.log(tokens) + 1e-5
  assert 1 <= metrics['attention_distinct'] <= tiny_config.model.num_parts
  assert metrics['bad_pairs'] == 0
  # One optimal matching per sample and direction: 2 x (all images / 2).
  assert metrics['assignment_counts'].sum() == batch['label'].size
  assert int(new_state.step) == 1
  unchanged = [
    jax.tree_util.keystr(path)
    for path, (old, new) in jax.tree_util.tree_leaves_with_path(
      jax.tree_util.tree_map(lambda a, b: (a, b), tiny_state.params, new_state.params),
      is_leaf=lambda x: isinstance(x, tuple),
    )
    if np.array_equal(np.asarray(old), np.asarray(new))
  ]
  assert not unchanged, f'parameters without gradient: {unchanged}'
  stats_moved = jax.tree_util.tree_map(
    lambda a, b: not np.allclose(a, b), tiny_state.batch_stats, new_state.batch_stats
  )
  assert all(jax.tree_util.tree_leaves(stats_moved))


def test_loss_falls_on_a_fixed_batch(tiny_config, tiny_state, p_train_step):
  batch = make_identity_batch(tiny_config, devices=2, seed=1)
  _, history = run_steps(p_train_step, tiny_state, [batch] * 8)
  losses = [float(m['loss']) for m in history]
  assert np.mean(losses[-2:]) < losses[0] - 0.1, losses


def as_float64(state):
  to64 = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)
  params = to64(state.params)
  return state.replace(
    params=params, batch_stats=to64(state.batch_stats), opt_state=state.tx.init(params)
  )


def test_two_devices_equal_one_device_on_the_concatenated_batch(tiny_config, tiny_state):
  """Synchronised BN, global PCL and position-keyed partners make the split exact.

  In float64, so that the comparison is not swamped by float32 rounding, which
  50 layers of backward pass amplify to ~1e-3 of an update.
  """
  batch = make_identity_batch(tiny_config, devices=2, seed=2)
  batch['image'] = batch['image'].astype(np.float64)
  concatenated = jax.tree_util.tree_map(lambda x: x.reshape(1, -1, *x.shape[2:]), batch)
  one_device = jax.local_devices()[:1]
  with jax.enable_x64(True):
    state = as_float64(tiny_state)
    two_state, (two_metrics,) = run_steps(make_p_train_step(tiny_config), state, [batch])
    one_state, (one_metrics,) = run_steps(
      make_p_train_step(tiny_config, one_device), state, [concatenated], one_device
    )
  for term in LOSS_TERMS + ATTENTION:
    np.testing.assert_allclose(two_metrics[term], one_metrics[term], rtol=1e-10, err_msg=term)
  np.testing.assert_array_equal(two_metrics['assignment_counts'], one_metrics['assignment_counts'])
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
    (two_state.params, two_state.batch_stats),
    (one_state.params, one_state.batch_stats),
  )


def test_missing_partner_is_reported(tiny_config, tiny_state, p_train_step):
  batch = make_identity_batch(tiny_config, devices=2, seed=3)
  batch['label'][0, -1] = 7  # an infrared image whose identity has no visible image here
  _, (metrics,) = run_steps(p_train_step, tiny_state, [batch])
  assert metrics['bad_pairs'] >= 1


def test_modality_specific_stems_start_equal_and_then_learn_apart(
  tiny_config, tiny_state, p_train_step
):
  for collection in (tiny_state.params, tiny_state.batch_stats):
    pairs = jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(
        lambda v, i: (np.asarray(v), np.asarray(i)),
        collection['stem_visible'],
        collection['stem_infrared'],
      ),
      is_leaf=lambda x: isinstance(x, tuple),
    )
    assert pairs and all(np.array_equal(v, i) for v, i in pairs)
  new_state, _ = run_steps(p_train_step, tiny_state, [make_identity_batch(tiny_config, 2)])
  visible = np.asarray(new_state.params['stem_visible']['conv1']['kernel'])
  infrared = np.asarray(new_state.params['stem_infrared']['conv1']['kernel'])
  assert not np.allclose(visible, infrared)  # two stems, not one shared


def test_bfloat16_step_is_finite_keeps_float32_state_and_learns(tiny_config, tiny_state):
  """config.model.dtype=bfloat16: the backbone's convolutions run in bf16, parameters,
  optimizer state and batch-norm statistics stay float32, every loss is finite and
  the loss falls on a fixed batch."""
  from conftest import NUM_CLASSES

  from cal_jax.training.state import build_model

  config = tiny_config.copy_and_resolve_references()
  config.model.dtype = 'bfloat16'
  model = build_model(config, NUM_CLASSES, axis_name=None)
  images = np.zeros((2, config.data.image_height, config.data.image_width, 3), np.float32)
  hlo = jax.jit(lambda v, x: model.apply(v, x, 0, method=model.embed)).lower(
    {'params': tiny_state.params, 'batch_stats': tiny_state.batch_stats}, images
  )
  convolutions = [line for line in hlo.as_text().splitlines() if 'convolution' in line]
  assert convolutions and all('bf16' in line for line in convolutions), convolutions[:2]
  state = tiny_state.replace(apply_fn=model.clone(axis_name='batch').apply)
  batch = make_identity_batch(config, devices=2, seed=1)
  new_state, history = run_steps(make_p_train_step(config), state, [batch] * 8)
  for term in LOSS_TERMS:
    assert all(np.isfinite(m[term]) for m in history), term
  leaves = jax.tree_util.tree_leaves((new_state.params, new_state.batch_stats, new_state.opt_state))
  assert {x.dtype for x in leaves if x.ndim} == {np.dtype(np.float32)}
  losses = [float(m['loss']) for m in history]
  assert np.mean(losses[-2:]) < losses[0] - 0.1, losses
