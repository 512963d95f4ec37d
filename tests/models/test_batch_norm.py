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
