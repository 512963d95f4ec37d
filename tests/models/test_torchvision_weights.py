"""Importing torchvision ResNets: feature maps against a torch reference, errors, safety.

The reference is `tests/torch_resnet.py` (torchvision's architecture and key
names, with a `width` so that the networks are small) with every weight and
running statistic random. Feature maps are compared in eval mode on NCHW vs
NHWC copies of the same images, of even and odd sizes (odd sizes catch
asymmetric padding), for last stride 2 (torchvision) and 1 (ReID).
"""

import functools
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cal_jax.models import resnet
from cal_jax.models import torchvision_weights as pretrained
from cal_jax.models.cal import CAL

torch = pytest.importorskip('torch')
safetensors_torch = pytest.importorskip('safetensors.torch')
torch_resnet = pytest.importorskip('torch_resnet')

WIDTH = 16
IMAGE_SIZES = [(64, 32), (67, 29)]  # even, and odd (padding must be symmetric)
TOLERANCE = 1e-4  # max abs difference in float32; feature maps are O(1)-O(10)


pytestmark = pytest.mark.usefixtures('single_torch_thread')


@functools.cache
def reference(arch: str, last_stride: int, width: int = WIDTH):
  return torch_resnet.randomize_(torch_resnet.ResNet(arch, width, last_stride), seed=len(arch))


@functools.cache
def jitted_resnet(depth: int, last_stride: int, width: int = WIDTH):
  return jax.jit(resnet.ResNet(depth=depth, width=width, last_stride=last_stride).apply)


def save_pth(state: dict, path) -> str:
  torch.save(state, path)
  return str(path)


def images_nchw(size: tuple[int, int], seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(2, 3, *size)).astype(np.float32)


def torch_features(net, images: np.ndarray) -> np.ndarray:
  """[B, 3, H, W] -> [B, h, w, C], in eval mode."""
  with torch.no_grad():
    return net.eval().features(torch.from_numpy(images)).numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
@pytest.mark.parametrize('last_stride', [2, 1])
def test_feature_maps_match_torch(tmp_path, arch, last_stride):
  net = reference(arch, last_stride)
  pth = save_pth(net.state_dict(), tmp_path / f'{arch}.pth')
  safetensors_path = str(tmp_path / f'{arch}.safetensors')
  safetensors_torch.save_file(net.state_dict(), safetensors_path)

  variables = pretrained.load_torchvision_resnet(pth, arch, width=WIDTH)
  from_safetensors = pretrained.load_torchvision_resnet(safetensors_path, arch, width=WIDTH)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, from_safetensors)
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {'stem', 'stages'}

  apply = jitted_resnet(pretrained.ARCHS[arch], last_stride)
  for size in IMAGE_SIZES:
    images = images_nchw(size)
    expected = torch_features(net, images)
    found = np.asarray(apply(variables, images.transpose(0, 2, 3, 1)))
    assert found.shape == expected.shape
    assert np.abs(expected).max() > 1.0  # the comparison is not of near-zero maps
    np.testing.assert_allclose(
      found,
      expected,
      rtol=0,
      atol=TOLERANCE,
      err_msg=f'{arch}, last stride {last_stride}, images {size}',
    )


@pytest.mark.parametrize('arch', sorted(pretrained.ARCHS))
def test_mapping_covers_every_torchvision_key(arch):
  """Every key but fc.* and num_batches_tracked is mapped, with torch's shape."""
  state = torch_resnet.ResNet(arch, width=8).state_dict()
  used = {k: tuple(v.shape) for k, v in state.items() if not pretrained.IGNORED.search(k)}
  mapping = pretrained.param_mapping(pretrained.ARCHS[arch], 8)
  assert list(mapping) == list(used)  # and in torchvision's order
  assert {k: pretrained.torch_shape(t) for k, t in mapping.items()} == used
  assert any(k.endswith('num_batches_tracked') for k in state) and 'fc.weight' in state


def test_conv_kernels_are_hwio_and_batch_norm_leaves_are_renamed(tmp_path):
  net = reference('resnet18', 2)
  state = net.state_dict()
  variables = pretrained.load_torchvision_resnet(
    save_pth(state, tmp_path / 'r.pth'), 'resnet18', width=WIDTH
  )
  np.testing.assert_array_equal(
    variables['params']['stem']['conv1']['kernel'],
    state['conv1.weight'].numpy().transpose(2, 3, 1, 0),
  )
  block = variables['params']['stages']['layer2_0']
  np.testing.assert_array_equal(
    block['downsample_conv']['kernel'][0, 0],
    state['layer2.0.downsample.0.weight'].numpy()[:, :, 0, 0].T,
  )
  np.testing.assert_array_equal(
    block['downsample_bn']['scale'], state['layer2.0.downsample.1.weight'].numpy()
  )
  stats = variables['batch_stats']['stages']['layer4_1']['bn2']
  np.testing.assert_array_equal(stats['mean'], state['layer4.1.bn2.running_mean'].numpy())
  np.testing.assert_array_equal(stats['var'], state['layer4.1.bn2.running_var'].numpy())


def load_error(tmp_path, state: dict, arch: str, width: int = WIDTH) -> str:
  path = save_pth(state, tmp_path / 'bad.pth')
  with pytest.raises(pretrained.CheckpointMismatchError) as error:
    pretrained.load_torchvision_resnet(path, arch, width=width)
  message = str(error.value)
  assert path in message and isinstance(error.value, ValueError)
  return message


def test_missing_key_is_named(tmp_path):
  state = reference('resnet18', 2).state_dict()
  del state['layer2.0.downsample.1.running_var']
  message = load_error(tmp_path, state, 'resnet18')
  assert f'missing key layer2.0.downsample.1.running_var: expected shape ({2 * WIDTH},)' in message


def test_unexpected_key_is_named(tmp_path):
  state = dict(reference('resnet18', 2).state_dict())
  state['layer1.0.se.weight'] = torch.zeros(4, 4)
  message = load_error(tmp_path, state, 'resnet18')
  assert 'unexpected key layer1.0.se.weight: found shape (4, 4)' in message


def test_resnet18_file_loaded_as_resnet50_names_key_shapes_and_depth(tmp_path):
  message = load_error(tmp_path, reference('resnet18', 2).state_dict(), 'resnet50')
  assert (
    f'key layer1.0.conv1.weight: expected shape ({WIDTH}, {WIDTH}, 1, 1), '
    f'found ({WIDTH}, {WIDTH}, 3, 3)'
  ) in message
  assert 'missing key layer1.0.conv3.weight' in message
  assert 'looks like a resnet18 checkpoint' in message
  assert 'config.model.depth=18' in message


def test_width_mismatch_suggests_the_width(tmp_path):
  message = load_error(tmp_path, reference('resnet18', 2).state_dict(), 'resnet18', width=64)
  assert f'expected shape (64, 3, 7, 7), found ({WIDTH}, 3, 7, 7)' in message
  assert f'config.model.width={WIDTH}' in message


def test_data_parallel_prefix_and_wrapped_checkpoints_are_explained(tmp_path):
  state = reference('resnet18', 2).state_dict()
  prefixed = {f'module.{k}': v for k, v in state.items()}
  assert "starts with 'module.'" in load_error(tmp_path, prefixed, 'resnet18')
  message = load_error(tmp_path, {'state_dict': state, 'epoch': 3}, 'resnet18')
  assert "key 'state_dict' holds a dict, not a tensor" in message


def test_missing_file_and_unknown_format(tmp_path):
  missing = str(tmp_path / 'resnet50-nowhere.pth')
  with pytest.raises(FileNotFoundError, match='resnet50-nowhere.pth'):
    pretrained.load_torchvision_resnet(missing, 'resnet50')
  other = tmp_path / 'weights.npz'
  other.write_bytes(b'')
  with pytest.raises(ValueError, match=r'weights\.npz.*\.safetensors'):
    pretrained.load_torchvision_resnet(str(other), 'resnet50')
  with pytest.raises(ValueError, match='resnet152'):
    pretrained.load_torchvision_resnet(str(other), 'resnet152')


def leave_marker(path: str) -> str:
  """What the malicious pickle below would run: it writes a file."""
  with open(path, 'w') as f:
    f.write('code ran')
  return path


class Payload:
  """An object whose unpickling calls `leave_marker`."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return leave_marker, (self.marker,)


@pytest.mark.parametrize('zipfile', [True, False])
def test_pickled_code_is_not_run(tmp_path, zipfile):
  marker = str(tmp_path / 'marker')
  state = dict(reference('resnet18', 2).state_dict(), payload=Payload(marker))
  path = str(tmp_path / 'malicious.pth')
  torch.save(state, path, _use_new_zipfile_serialization=zipfile)
  with pytest.raises(pickle.UnpicklingError, match='malicious.pth: refused'):
    pretrained.load_torchvision_resnet(path, 'resnet18', width=WIDTH)
  assert not os.path.exists(marker)
  # The payload is live: an unrestricted load would have run it.
  torch.load(path, weights_only=False)
  assert os.path.exists(marker)


def cal_shapes(
  modality_specific_stem: bool, depth: int = 18, width: int = WIDTH
) -> tuple[CAL, dict]:
  """A small CAL and the shapes of its variables (nothing is computed)."""
  model = CAL(
    num_classes=4,
    depth=depth,
    width=width,
    modality_specific_stem=modality_specific_stem,
    adapter_hidden=16,
    adapter_dim=8,
    channel_reduction=4,
  )
  images = jnp.zeros((2, 64, 32, 3))
  partners = jnp.zeros((2,), jnp.int32)
  return model, jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    images,
    images,
    partners,
    partners,
  )


@pytest.fixture(scope='module')
def backbone18(tmp_path_factory):
  path = tmp_path_factory.mktemp('backbone') / 'resnet18.safetensors'
  safetensors_torch.save_file(reference('resnet18', 1).state_dict(), str(path))
  return pretrained.load_torchvision_resnet(str(path), 'resnet18', width=WIDTH)


def test_apply_to_cal_fills_both_stems_and_the_stages(backbone18):
  model, shapes = cal_shapes(modality_specific_stem=True)
  variables = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 7, s.dtype), shapes)
  filled = pretrained.apply_to_cal(variables, backbone18, modality_specific_stem=True)
  for collection in ('params', 'batch_stats'):
    for name, source in [('stem_visible', 'stem'), ('stem_infrared', 'stem'), ('stages', 'stages')]:
      jax.tree_util.tree_map(
        np.testing.assert_array_equal, filled[collection][name], backbone18[collection][source]
      )
  untouched = filled['params']['adapter']
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: bool(jnp.all(x == 7)), untouched))
  assert jnp.all(variables['params']['stages']['layer1_0']['conv1']['kernel'] == 7)  # a copy

  # The CAL backbone now computes the torch network's feature maps, for both modalities.
  images = images_nchw(IMAGE_SIZES[1], seed=1)
  expected = torch_features(reference('resnet18', 1), images)
  nhwc = images.transpose(0, 2, 3, 1)
  feature_maps = jax.jit(functools.partial(model.apply, method=CAL.feature_maps, train=False))
  map_v, map_i = feature_maps(filled, nhwc, nhwc)
  np.testing.assert_allclose(map_v, expected, rtol=0, atol=TOLERANCE)
  np.testing.assert_allclose(map_i, expected, rtol=0, atol=TOLERANCE)


def test_apply_to_cal_with_a_shared_stem(backbone18):
  _, shapes = cal_shapes(modality_specific_stem=False)
  assert 'stem_infrared' not in shapes['params']
  filled = pretrained.apply_to_cal(shapes, backbone18, modality_specific_stem=False)
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, filled['params']['stem_visible'], backbone18['params']['stem']
  )
  with pytest.raises(pretrained.CheckpointMismatchError, match='modality_specific_stem'):
    pretrained.apply_to_cal(shapes, backbone18, modality_specific_stem=True)


def test_apply_to_cal_names_width_and_depth_mismatches(backbone18):
  _, narrow = cal_shapes(modality_specific_stem=True, width=8)
  with pytest.raises(
    ValueError,
    match=r'(?s)resnet18 of width 16.*resnet18 of width 8'
    r'.*config\.model\.width',
  ):
    pretrained.apply_to_cal(narrow, backbone18, modality_specific_stem=True)
  _, deeper = cal_shapes(modality_specific_stem=True, depth=50)
  with pytest.raises(ValueError, match=r'(?s)resnet50 of width 16.*layer1_0/conv3.*missing'):
    pretrained.apply_to_cal(deeper, backbone18, modality_specific_stem=True)


def test_torchvision_state_dict_is_the_loader_backwards():
  """ResNet variables -> torchvision tensors -> variables again, leaf for leaf; the
  convolutions come out OIHW, as torchvision holds them."""
  model = resnet.ResNet(depth=50, width=4)
  variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  state = pretrained.torchvision_state_dict(variables, 50, 4)
  assert list(state) == list(pretrained.param_mapping(50, 4))
  kernel = np.asarray(variables['params']['stages']['layer2_0']['conv2']['kernel'])  # HWIO
  np.testing.assert_array_equal(state['layer2.0.conv2.weight'], kernel.transpose(3, 2, 0, 1))
  back = pretrained.convert_state_dict(state, 'resnet50', 4)
  for collection in ('params', 'batch_stats'):
    jax.tree.map(
      np.testing.assert_array_equal, back[collection], jax.device_get(variables[collection])
    )
