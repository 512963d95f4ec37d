"""M-hat's bookkeeping: the counts per epoch, the last-else-current rule, the checkpoint form."""

import itertools
import json

import numpy as np
import pytest

from cal_jax.training.assignments import AssignmentCounts, most_frequent_assignment

PERMUTATIONS = list(itertools.permutations(range(4)))


def test_most_frequent_assignment():
  counts = np.zeros(24, np.int64)
  assert most_frequent_assignment(counts, 4).tolist() == [0, 1, 2, 3]
  counts[PERMUTATIONS.index((1, 3, 0, 2))] = 5
  counts[PERMUTATIONS.index((3, 2, 1, 0))] = 4
  assert most_frequent_assignment(counts, 4).tolist() == [1, 3, 0, 2]
  with pytest.raises(ValueError, match='num_parts=3'):
    most_frequent_assignment(counts, 3)


def one_hot(permutation, times=1):
  counts = np.zeros(24, np.int64)
  counts[PERMUTATIONS.index(permutation)] = times
  return counts


def test_m_hat_is_the_last_epochs_else_the_current_ones():
  counts = AssignmentCounts.zeros(4)
  assert counts.m_hat().tolist() == [0, 1, 2, 3]  # nothing counted: the identity
  counts.add(one_hot((1, 0, 2, 3), 2))
  assert counts.m_hat().tolist() == [1, 0, 2, 3]  # no epoch has ended: the current one's
  counts.end_epoch()
  counts.add(one_hot((3, 2, 1, 0), 5))
  assert counts.m_hat().tolist() == [1, 0, 2, 3]  # the last finished epoch's
  counts.end_epoch()
  assert counts.m_hat().tolist() == [3, 2, 1, 0]
  assert not counts.current.any()


def test_json_round_trip_as_checkpoints_keep_it():
  counts = AssignmentCounts.zeros(4)
  counts.add(one_hot((0, 2, 1, 3), 3))
  counts.end_epoch()
  counts.add(one_hot((1, 0, 2, 3)))
  extra = json.loads(json.dumps(counts.to_json()))
  assert sorted(extra) == ['epoch_counts', 'last_epoch_counts']
  again = AssignmentCounts.from_json(extra, 4)
  np.testing.assert_array_equal(again.current, counts.current)
  np.testing.assert_array_equal(again.last, counts.last)
  assert again.m_hat().tolist() == counts.m_hat().tolist() == [0, 2, 1, 3]
