"""A diverged update is refused before it is saved (`divergence.check_finite_state`)."""

import types

import numpy as np
import pytest

from cal_jax.training import divergence
from configs import sysu, tiny


def state(bad=None):
  params = {'a': np.ones((2, 3), np.float32), 'b': {'c': np.zeros((4,), np.float32)}}
  stats = {'mean': np.zeros((3,), np.float32)}
  if bad == 'params':
    params['b']['c'][2] = np.inf
  if bad == 'stats':
    stats['mean'][0] = np.nan
  return types.SimpleNamespace(params=params, batch_stats=stats)


def test_a_finite_state_passes():
  divergence.check_finite_state(5, state(), tiny.get_config())


@pytest.mark.parametrize('bad', ['params', 'stats'])
def test_non_finite_parameters_or_statistics_are_refused_in_one_line(bad):
  with pytest.raises(divergence.NonFiniteLossError) as raised:
    divergence.check_finite_state(7, state(bad), tiny.get_config())
  message = str(raised.value)
  assert '\n' not in message
  assert message.startswith('the parameters became non-finite in the update of step 7')
  assert message.endswith('lower config.optim.base_lr.')
  assert 'pcl_reduction' not in message  # the measured variant: not the cause named


def test_the_paper_s_pcl_sums_are_named_as_the_likely_cause():
  with pytest.raises(
    divergence.NonFiniteLossError, match='--config.loss.pcl_reduction=normalised_mean'
  ):
    divergence.check_finite_state(1, state('params'), sysu.get_config())


def test_raw_features_under_the_sums_are_named_first():
  config = sysu.get_config()
  config.loss.pcl_features = 'raw'
  with pytest.raises(divergence.NonFiniteLossError) as raised:
    divergence.check_finite_state(1, state('params'), config)
  message = str(raised.value)
  assert '--config.loss.pcl_features=unit_parts' in message
  assert 'normalised_mean' not in message
