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
