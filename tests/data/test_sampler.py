"""Tests of the cross-modal identity sampler (cal_jax.data.sampler)."""

import numpy as np
import pytest

from cal_jax.data import sampler as sampler_lib

P, K = 4, 3


def _toy_split(seed: int = 0):
  """10 identities, non-contiguous numbers, some with fewer than K images."""
  rng = np.random.default_rng(seed)
  ids, modality = [], []
  for number in (3, 8, 11, 20, 21, 34, 50, 51, 77, 90):
    for m in (0, 1):
      count = int(rng.integers(1, 9))
      ids += [number] * count
      modality += [m] * count
  order = rng.permutation(len(ids))  # examples of an identity are scattered
  return np.array(ids)[order], np.array(modality)[order]


def _sampler(balanced=False, seed=0, **kwargs):
  ids, modality = _toy_split()
  return sampler_lib.CrossModalIdentitySampler(
    ids, modality, num_ids_per_batch=P, num_pos=K, seed=seed, balanced=balanced, **kwargs
  )


@pytest.mark.parametrize('balanced', [False, True])
def test_every_batch_has_the_configured_counts(balanced):
  s = _sampler(balanced)
  ids, modality = _toy_split()
  for step in range(2 * s.steps_per_epoch + 3):
    labels, visible, infrared = s.global_batch(step)
    assert len(set(labels.tolist())) == P
    assert visible.shape == infrared.shape == (P, K)
    for label, vis, ir in zip(labels, visible, infrared):
      number = s.identities[label]
      assert (ids[vis] == number).all() and (modality[vis] == 0).all()
      assert (ids[ir] == number).all() and (modality[ir] == 1).all()


def test_labels_are_sorted_identity_numbers():
  s = _sampler()
  ids, _ = _toy_split()
  np.testing.assert_array_equal(s.identities, [3, 8, 11, 20, 21, 34, 50, 51, 77, 90])
  np.testing.assert_array_equal(s.identities[s.labels], ids)
  assert s.num_classes == 10


def test_epoch_length_is_agw():
  ids, modality = _toy_split()
  largest = max((modality == 0).sum(), (modality == 1).sum())
  assert _sampler().steps_per_epoch == largest // (P * K) + 1
  assert _sampler(steps_per_epoch=7).steps_per_epoch == 7


def test_balanced_identities_do_not_repeat_within_a_pass():
  s = _sampler(balanced=True, steps_per_epoch=12)
  per_pass = s.num_classes // P  # 2 batches
  for epoch in range(2):
    for first in range(0, s.steps_per_epoch, per_pass):
      step = epoch * s.steps_per_epoch + first
      drawn = np.concatenate([s.global_batch(step + i)[0] for i in range(per_pass)])
      assert len(set(drawn.tolist())) == per_pass * P


def test_balanced_images_without_replacement_when_enough():
  s = _sampler(balanced=True, steps_per_epoch=20)
  ids, modality = _toy_split()
  for step in range(20):
    labels, visible, infrared = s.global_batch(step)
    for m, chosen in ((0, visible), (1, infrared)):
      for label, drawn in zip(labels, chosen):
        available = ((ids == s.identities[label]) & (modality == m)).sum()
        if available >= K:
          assert len(set(drawn.tolist())) == K


def test_agw_draws_images_with_replacement():
  # AGW: np.random.choice(pos, num_pos) has replace=True; one identity with
  # many images still shows repeats over many draws.
  ids = np.array([1] * 4 + [1] * 4 + [2] * 4 + [2] * 4)
  modality = np.array([0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)
  s = sampler_lib.CrossModalIdentitySampler(
    ids, modality, num_ids_per_batch=2, num_pos=4, seed=0, steps_per_epoch=50
  )
  repeats = sum(len(set(s.global_batch(i)[1][0].tolist())) < 4 for i in range(50))
  assert repeats > 0


def test_same_seed_and_step_same_batch_without_replay():
  a, b = _sampler(seed=5), _sampler(seed=5)
  step = 3 * a.steps_per_epoch + 2
  a.batch_indices(0)  # a has another epoch cached, b starts cold
  for x, y in zip(a.global_batch(step), b.global_batch(step)):
    np.testing.assert_array_equal(x, y)
  other = _sampler(seed=6)
  assert any(
    not np.array_equal(x, y) for x, y in zip(a.global_batch(step), other.global_batch(step))
  )


def test_epochs_are_reshuffled():
  s = _sampler(steps_per_epoch=5)
  first = [s.global_batch(i)[0] for i in range(5)]
  second = [s.global_batch(5 + i)[0] for i in range(5)]
  assert not all(np.array_equal(x, y) for x, y in zip(first, second))


def test_shard_layout_holds_whole_identities():
  s = _sampler(local_devices=2)
  labels, visible, infrared = s.global_batch(4)
  batch = s.batch_indices(4)
  q = P // 2
  assert batch.index.shape == (2, 2 * q * K) and s.per_device_batch == 2 * q * K
  for d in range(2):
    ids_d = labels[d * q : (d + 1) * q]
    np.testing.assert_array_equal(
      batch.index[d],
      np.concatenate([visible[d * q : (d + 1) * q].ravel(), infrared[d * q : (d + 1) * q].ravel()]),
    )
    np.testing.assert_array_equal(batch.label[d], np.tile(np.repeat(ids_d, K), 2))
    np.testing.assert_array_equal(batch.modality[d], np.repeat([0, 1], q * K))
    np.testing.assert_array_equal(batch.position[d], d * 2 * q * K + np.arange(2 * q * K))


def test_hosts_are_disjoint_and_cover_the_global_batch():
  hosts = [_sampler(local_devices=1, num_hosts=4, host_index=h) for h in range(4)]
  whole = _sampler(local_devices=4)
  for step in (0, 7, 31):
    parts = [h.batch_indices(step) for h in hosts]
    positions = np.concatenate([p.position.ravel() for p in parts])
    assert sorted(positions.tolist()) == list(range(2 * P * K))
    label_sets = [set(p.label.ravel().tolist()) for p in parts]
    assert sum(len(x) for x in label_sets) == P  # no identity on two hosts
    full = whole.batch_indices(step)
    np.testing.assert_array_equal(np.concatenate([p.index for p in parts]), full.index)
    np.testing.assert_array_equal(np.concatenate([p.label for p in parts]), full.label)


def test_indivisible_shards_name_the_config_fields():
  with pytest.raises(ValueError, match='num_ids_per_batch.*local_devices'):
    _sampler(local_devices=3)


def test_identity_lacking_a_modality_is_named():
  ids = np.array([1, 1, 2, 7, 7])
  modality = np.array([0, 1, 0, 0, 1])
  with pytest.raises(ValueError, match=r'no infrared image.*\[2\]'):
    sampler_lib.CrossModalIdentitySampler(ids, modality, num_ids_per_batch=1, num_pos=1, seed=0)


def test_from_config():
  import ml_collections

  config = ml_collections.ConfigDict(
    {
      'seed': 5,
      'data': {'num_ids_per_batch': P, 'num_pos': K, 'balanced_sampler': False},
      'optim': {'steps_per_epoch': 0},
    }
  )
  ids, modality = _toy_split()
  s = sampler_lib.CrossModalIdentitySampler.from_config(config, ids, modality, local_devices=2)
  assert (s.num_ids_per_batch, s.num_pos, s.seed) == (P, K, 5)
  assert not s.balanced
  assert s.per_device_batch == 2 * K * P // 2
  np.testing.assert_array_equal(s.global_batch(9)[1], _sampler(seed=5).global_batch(9)[1])
