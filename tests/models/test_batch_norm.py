"""BatchNorm against torch.nn.BatchNorm2d: outputs and running statistics."""

import jax
import numpy as np
import pytest

from cal_jax.models.batch_norm import BatchNorm

torch = pytest.importorskip('torch')


def test_train_and_eval_match_torch_batchnorm2d():
  rng = np.random.default_rng(0)
  x = rng.normal(loc=3.0, scale=2.0, size=(4, 5, 3, 6)).astype(np.float32)  # NHWC
  reference = torch.nn.BatchNorm2d(6)  # eps 1e-5, momentum 0.1
  with torch.no_grad():
    reference.weight.copy_(torch.tensor(rng.normal(size=6)))
    reference.bias.copy_(torch.tensor(rng.normal(size=6)))
  module = BatchNorm()
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  params = {'scale': reference.weight.detach().numpy(), 'bias': reference.bias.detach().numpy()}
  stats = variables['batch_stats']

  x_torch = torch.tensor(x.transpose(0, 3, 1, 2))
  for step in range(3):
    reference.train()
    expected = reference(x_torch + step).detach().numpy().transpose(0, 2, 3, 1)
    out, mutated = module.apply(
      {'params': params, 'batch_stats': stats},
      x + step,
      use_running_average=False,
      mutable=['batch_stats'],
    )
    stats = mutated['batch_stats']
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats['mean'], reference.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats['var'], reference.running_var.numpy(), rtol=1e-5)

  reference.eval()
  expected = reference(x_torch).detach().numpy().transpose(0, 2, 3, 1)
  out = module.apply({'params': params, 'batch_stats': stats}, x, use_running_average=True)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_synchronised_batch_norm_equals_whole_batch():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 3, 2, 4)).astype(np.float32)
  module = BatchNorm(axis_name='batch')
  variables = BatchNorm().init(jax.random.key(0), x, use_running_average=False)
  whole, whole_stats = BatchNorm().apply(
    variables, x, use_running_average=False, mutable=['batch_stats']
  )
  split, split_stats = jax.pmap(
    lambda v, xs: module.apply(v, xs, use_running_average=False, mutable=['batch_stats']),
    axis_name='batch',
    in_axes=(None, 0),
  )(variables, x.reshape(2, 4, 3, 2, 4))
  np.testing.assert_allclose(np.asarray(split).reshape(x.shape), whole, rtol=1e-5, atol=1e-6)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(
      split_stats['batch_stats'][name][0], whole_stats['batch_stats'][name], rtol=1e-5
    )


def test_statistics_rows_normalise_appended_rows_without_counting_them():
  """statistics_rows=4 of 6: every row normalised with the numpy moments of the first
  four, and the running statistics updated from those four only (unbiased variance)."""
  rng = np.random.default_rng(2)
  x = rng.normal(loc=1.0, scale=3.0, size=(6, 3, 5)).astype(np.float32)
  module = BatchNorm(use_bias=False)
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  out, mutated = module.apply(
    variables, x, use_running_average=False, statistics_rows=4, mutable=['batch_stats']
  )
  counted = x[:4].reshape(-1, 5).astype(np.float64)
  mean, var = counted.mean(0), counted.var(0)
  np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
  n = len(counted)
  np.testing.assert_allclose(mutated['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(
    mutated['batch_stats']['var'], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5
  )
  whole, _ = module.apply(variables, x[:4], use_running_average=False, mutable=['batch_stats'])
  np.testing.assert_allclose(out[:4], whole, rtol=1e-6, atol=1e-6)


def test_appended_rows_send_no_gradient_through_the_moments():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 5)).astype(np.float32)
  module = BatchNorm(use_bias=False)
  variables = module.init(jax.random.key(0), x, use_running_average=False)

  def appended_sum(x):
    out, _ = module.apply(
      variables, x, use_running_average=False, statistics_rows=4, mutable=['batch_stats']
    )
    return (out[4:] * np.arange(10, dtype=np.float32).reshape(2, 5)).sum()

  grad = np.asarray(jax.grad(appended_sum)(x))
  np.testing.assert_array_equal(grad[:4], 0.0)
  # Rows 4-5 are divided by the counted rows' standard deviation, nothing more.
  std = np.sqrt(x[:4].astype(np.float64).var(0) + 1e-5)
  np.testing.assert_allclose(grad[4:], np.arange(10).reshape(2, 5) / std, rtol=1e-5)
