"""ResNet structure: shapes per depth and last stride, torchvision-style names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cal_jax.models import resnet


@pytest.mark.parametrize('depth,channels', [(18, 512), (34, 512), (50, 2048), (101, 2048)])
@pytest.mark.parametrize('last_stride', [1, 2])
def test_feature_map_shape(depth, channels, last_stride):
  model = resnet.ResNet(depth=depth, last_stride=last_stride)
  images = jnp.zeros((2, 288, 144, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  out = jax.eval_shape(model.apply, variables, images)
  # 288x144 -> 18x9 after layer3; a stride-2 layer4 (padding 1) gives 9x5, as torchvision.
  expected_hw = (18, 9) if last_stride == 1 else (9, 5)
  assert out.shape == (2, *expected_hw, channels)
  assert resnet.output_channels(depth) == channels


def test_parameter_names_follow_torchvision():
  variables = jax.eval_shape(
    resnet.ResNet(depth=50).init, jax.random.key(0), jnp.zeros((1, 64, 32, 3))
  )
  stages = variables['params']['stages']
  assert sorted(stages) == sorted(resnet.stage_names(50))
  assert set(stages['layer1_0']) == {
    'conv1',
    'bn1',
    'conv2',
    'bn2',
    'conv3',
    'bn3',
    'downsample_conv',
    'downsample_bn',
  }
  assert 'downsample_conv' not in stages['layer1_1']
  assert stages['layer4_0']['conv2']['kernel'].shape == (3, 3, 512, 512)  # HWIO
  assert set(variables['batch_stats']['stem']['bn1']) == {'mean', 'var'}


def test_stride_two_convolution_pads_symmetrically():
  """A centred impulse stays centred through conv1 (7x7, stride 2), as in PyTorch."""
  model = resnet.conv(1, 7, 2)
  variables = {'params': {'kernel': jnp.zeros((7, 7, 1, 1)).at[3, 3].set(1.0)}}
  x = jnp.zeros((1, 8, 8, 1)).at[0, 4, 4].set(1.0)
  y = np.asarray(model.apply(variables, x))[0, :, :, 0]
  # torch.nn.Conv2d(1, 1, 7, 2, 3) maps input (4, 4) to output (2, 2).
  assert y.shape == (4, 4) and y[2, 2] == 1.0 and y.sum() == 1.0


def test_unknown_depth_is_refused():
  with pytest.raises(ValueError, match='config.model.depth=42'):
    resnet.output_channels(42)


@pytest.mark.parametrize('nested', [False, True])
def test_remat_keeps_the_parameters_and_the_gradient(nested):
  """config.model.remat: the same parameter tree, the same gradient (remat only
  recomputes), and the blocks of the named stages are checkpointed in the jaxpr
  (nested: each of those stages around its blocks as well)."""
  x = jax.random.normal(jax.random.key(1), (2, 64, 32, 3))
  plain = resnet.ResNet(18, 8, 1)
  remat = resnet.ResNet(18, 8, 1, remat=(2, 4), remat_nested=nested)
  variables = plain.init(jax.random.key(0), x)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
    remat.init(jax.random.key(0), x)
  )

  def loss(model):
    def f(params):
      y, _ = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        x,
        True,
        mutable=['batch_stats'],
      )
      return jnp.sum(jnp.square(y))

    return f

  grads = [jax.grad(loss(m))(variables['params']) for m in (plain, remat)]
  for a, b in zip(*(jax.tree_util.tree_leaves(g) for g in grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # The forward pass: one checkpoint per block (layer2's 2, layer4's 2), and one
  # around each nested stage.
  forward = str(jax.make_jaxpr(loss(remat))(variables['params']))
  assert forward.count('remat') == 2 + 2 + (2 if nested else 0)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(remat)))(variables['params']))
  # The gradient: nested, the stages' recomputations hold their blocks' checkpoints again.
  assert jaxpr.count('remat') == (2 + 2 * 4 if nested else 4)
  assert 'remat' not in str(jax.make_jaxpr(jax.grad(loss(plain)))(variables['params']))
  with pytest.raises(ValueError, match=r'config.model.remat=\(5,\)'):
    resnet.ResNet(18, 8, 1, remat=(5,)).init(jax.random.key(0), x)


@pytest.mark.parametrize('nested', [False, True])
def test_remat_fields_of_the_config_reach_the_backbone(nested):
  from cal_jax.training.state import build_model
  from configs import tiny

  config = tiny.get_config()
  config.model.remat = (1, 3)
  config.model.remat_nested = nested
  model = build_model(config, 5)
  assert (tuple(model.remat), model.remat_nested) == ((1, 3), nested)
  images = jnp.zeros((2, 64, 32, 3))
  partner = jnp.array([1, 0])
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), images, images, partner, partner)
  )
  forward = jax.make_jaxpr(
    lambda v: model.apply(v, images, images, partner, partner, mutable=['batch_stats'])
  )(variables)
  per_stage = resnet.ARCHITECTURES[config.model.depth][1]
  blocks = per_stage[0] + per_stage[2]  # stages 1 and 3
  assert str(forward).count('remat') == blocks + (2 if nested else 0)
