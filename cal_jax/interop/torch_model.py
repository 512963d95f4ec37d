"""The CAL inference path in plain PyTorch, for models exported by `cal_jax.convert`.

This file and `torch_files.py` (reading the exported files) need torch (and
safetensors for `.safetensors` files) only, nothing of JAX or cal_jax: the two
can be copied into a PyTorch project side by side. It computes what
`cal_jax.models.cal.CAL.embed` computes (Sec. 3.4 of the CAL paper):

  stem of the modality -> shared layer1..layer4 (torchvision ResNet, eval BN)
  -> DRM of the modality (Eq. 3): multi-scale max-pool, point-wise prototypes,
     softmax over tokens, top-N_k tokens per part, weighted aggregation
  -> TSAA self-refinement (Eqs. 7-10): instance norm, MLPs, attention, gates
  -> BNNeck (batch norm without shift) -> per-part L2 normalisation -> flatten

so that `similarity(visible, infrared)` (a dot product) is the sum over parts
of cosine similarities. Usage:

  model = load('cal_sysu.safetensors')  # or .pt; eval mode, on the CPU
  visible = model(images_visible, VISIBLE)  # [B, 3, H, W], ImageNet-normalised RGB
  infrared = model(images_infrared, INFRARED)
  scores = similarity(visible, infrared)  # [B_v, B_i], higher is more alike

The visible prototypes in an exported file are already reordered by M-hat,
the most frequent part matching of training, so part p of both modalities
describes the same body region.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # in cal_jax
  from cal_jax.interop.torch_files import FORMAT, WeightFileError, read
except ImportError:  # copied into a PyTorch project, beside torch_files.py
  from torch_files import FORMAT, WeightFileError, read  # noqa: F401  (re-exported)

VISIBLE = 0
INFRARED = 1

# depth -> (block kind, blocks per stage), as torchvision's resnet18 .. resnet101.
ARCHITECTURES = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
  101: ('bottleneck', (3, 4, 23, 3)),
}

# Hyper-parameters of `CALInference`, with the defaults of configs/default.py.
DEFAULT_CONFIG = {
  'depth': 50,
  'width': 64,
  'last_stride': 1,
  'modality_specific_stem': True,
  'shared_region_mining': False,
  'num_parts': 4,
  'select_ratio': 0.6,
  'pool_sizes': [1, 3, 5],
  'adapter_hidden': 512,
  'adapter_dim': 256,
  'channel_reduction': 16,
}

# Every hyper-parameter: (check, what it must be).
_INT = lambda low: lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low
_ONE_OF = lambda choices: lambda v: isinstance(v, int) and not isinstance(v, bool) and v in choices
HYPERPARAMETER_CHECKS = {
  'depth': (_ONE_OF(ARCHITECTURES), f'one of {sorted(ARCHITECTURES)}'),
  'width': (_INT(1), 'an integer >= 1'),
  'last_stride': (_ONE_OF((1, 2)), '1 or 2'),
  'modality_specific_stem': (lambda v: isinstance(v, bool), 'true or false'),
  'shared_region_mining': (lambda v: isinstance(v, bool), 'true or false'),
  'num_parts': (_INT(1), 'an integer >= 1'),
  'select_ratio': (
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
    'a number in (0, 1]',
  ),
  'pool_sizes': (
    lambda v: (
      isinstance(v, (list, tuple)) and len(v) > 0 and all(_INT(1)(s) and s % 2 == 1 for s in v)
    ),
    'a non-empty list of odd integers >= 1',
  ),
  'adapter_hidden': (_INT(1), 'an integer >= 1'),
  'adapter_dim': (_INT(1), 'an integer >= 1'),
  'channel_reduction': (_INT(1), 'an integer >= 1'),
}

BN_EPSILON = 1e-5
INSTANCE_NORM_EPSILON = 1e-5
L2_EPSILON = 1e-12  # on the squared norm, as cal_jax.models.normalize.l2_normalize
MAX_IMAGE_SIDE = 8192  # pixels: the largest input side an exported file may ask for


def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(
    in_channels, out_channels, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False
  )


class BasicBlock(nn.Module):
  """torchvision `BasicBlock`: two 3x3 convolutions and a shortcut."""

  expansion = 1

  def __init__(self, in_channels: int, features: int, stride: int, downsample: bool):
    super().__init__()
    self.conv1 = conv(in_channels, features, 3, stride)
    self.bn1 = nn.BatchNorm2d(features, eps=BN_EPSILON)
    self.conv2 = conv(features, features, 3)
    self.bn2 = nn.BatchNorm2d(features, eps=BN_EPSILON)
    self.downsample = (
      nn.Sequential(
        conv(in_channels, features, 1, stride), nn.BatchNorm2d(features, eps=BN_EPSILON)
      )
      if downsample
      else None
    )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  """torchvision `Bottleneck` (v1.5: the stride on the 3x3 convolution)."""

  expansion = 4

  def __init__(self, in_channels: int, features: int, stride: int, downsample: bool):
    super().__init__()
    out = features * self.expansion
    self.conv1 = conv(in_channels, features, 1)
    self.bn1 = nn.BatchNorm2d(features, eps=BN_EPSILON)
    self.conv2 = conv(features, features, 3, stride)
    self.bn2 = nn.BatchNorm2d(features, eps=BN_EPSILON)
    self.conv3 = conv(features, out, 1)
    self.bn3 = nn.BatchNorm2d(out, eps=BN_EPSILON)
    self.downsample = (
      nn.Sequential(conv(in_channels, out, 1, stride), nn.BatchNorm2d(out, eps=BN_EPSILON))
      if downsample
      else None
    )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Stem(nn.Module):
  """conv1 (7x7, stride 2) -> bn1 -> relu -> maxpool (3x3, stride 2, pad 1)."""

  def __init__(self, width: int):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width, eps=BN_EPSILON)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, width, H/4, W/4]."""
    return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)


def make_stage(
  block: type, in_channels: int, features: int, num_blocks: int, stride: int
) -> nn.Sequential:
  """torchvision's `_make_layer`: a projection shortcut where the shape changes."""
  out = features * block.expansion
  blocks = [block(in_channels, features, stride, stride != 1 or in_channels != out)]
  blocks += [block(out, features, 1, False) for _ in range(1, num_blocks)]
  return nn.Sequential(*blocks)


def num_selected_tokens(num_tokens: int, num_parts: int, select_ratio: float) -> int:
  """N_k of Eq. (3): ceil(alpha * H*W / N_p), at least 1 and at most H*W."""
  n_k = math.ceil(select_ratio * num_tokens / num_parts - 1e-9)
  return max(1, min(num_tokens, n_k))


class RegionMining(nn.Module):
  """DRM of one modality at test time: part scores, top-N_k tokens, part features (Eq. 3)."""

  def __init__(self, channels: int, num_parts: int, select_ratio: float, pool_sizes: Sequence[int]):
    super().__init__()
    self.num_parts = num_parts
    self.select_ratio = select_ratio
    self.pool_sizes = tuple(pool_sizes)
    self.prototypes = nn.Linear(channels * len(self.pool_sizes), num_parts)

  def forward(self, feature_map: torch.Tensor) -> dict[str, torch.Tensor]:
    """X [B, C, H, W] -> 'tokens' T [B, H*W, C], 'scores' S and 'selected' S_hat
    [B, H*W, N_p], 'parts' P [B, N_p, C]. Tokens are in row-major (h, w) order."""
    # Stride 1 with -inf padding (max_pool2d's): every scale keeps the size.
    pooled = torch.cat(
      [
        feature_map if size == 1 else F.max_pool2d(feature_map, size, stride=1, padding=size // 2)
        for size in self.pool_sizes
      ],
      dim=1,
    )
    tokens = feature_map.flatten(2).transpose(1, 2)
    scores = torch.softmax(self.prototypes(pooled.flatten(2).transpose(1, 2)), dim=1)
    n_k = num_selected_tokens(tokens.shape[1], self.num_parts, self.select_ratio)
    # A stable descending sort keeps the lower index first among equal scores,
    # the tie-break of jax.lax.top_k, so both select the same tokens.
    if torch.onnx.is_in_onnx_export():  # ONNX TopK puts the lower index first among equals
      order = torch.topk(scores, n_k, dim=1).indices
    else:
      order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n_k]
    mask = torch.zeros_like(scores).scatter_(1, order, 1.0)
    selected = scores * mask
    parts = torch.einsum('bnk,bnc->bkc', selected, tokens) / selected.sum(1)[..., None]
    return {'tokens': tokens, 'scores': scores, 'selected': selected, 'parts': parts}


class MLP(nn.Module):
  """Linear -> ReLU -> Linear on the last axis."""

  def __init__(self, in_features: int, hidden: int, out: int):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden)
    self.fc2 = nn.Linear(hidden, out)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.relu(self.fc1(x)))


def instance_normalize(x: torch.Tensor, source_tokens: torch.Tensor) -> torch.Tensor:
  """Eq. (7): x [B, M, C] normalised with the per-channel token statistics of
  source_tokens [B, N, C] (biased variance)."""
  mean = source_tokens.mean(dim=1, keepdim=True)
  var = source_tokens.var(dim=1, unbiased=False, keepdim=True)
  return (x - mean) / torch.sqrt(var + INSTANCE_NORM_EPSILON)


class AttentionAdapter(nn.Module):
  """TSAA (Sec. 3.2.2): theta_1 (tokens), theta_2 (queries), theta_3 (channel gates)."""

  def __init__(self, channels: int, hidden: int, dim: int, channel_reduction: int):
    super().__init__()
    self.token_mlp = MLP(channels, hidden, dim)
    self.query_mlp = MLP(channels, hidden, dim)
    self.channel_mlp = MLP(channels, max(1, channels // channel_reduction), channels)

  def forward(self, tokens: torch.Tensor, parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-refinement A(T; P) (Eqs. 8-10, 12).

    Args:
      tokens: T [B, H*W, C]; parts: P [B, N_p, C], aggregated from T.
    Returns:
      (refined features f [B, N_p, C], similarity S [B, N_p, H*W]).
    """
    tokens_hat = self.token_mlp(instance_normalize(tokens, tokens))
    queries_hat = self.query_mlp(instance_normalize(parts, tokens))
    logits = queries_hat @ tokens_hat.transpose(1, 2) / math.sqrt(queries_hat.shape[-1])
    similarity = torch.softmax(logits, dim=-1)
    gates = torch.sigmoid(self.channel_mlp(parts))
    return (similarity @ tokens) * gates, similarity


class BNNeck(nn.BatchNorm1d):
  """BNNeck of AGW: batch norm with a scale and no shift (no `bias` tensor)."""

  def __init__(self, channels: int):
    super().__init__(channels, eps=BN_EPSILON)
    self.register_parameter('bias', None)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x [..., C]. At test time written out per channel: it applies to any leading
    axes, and the ONNX export needs no channel count it cannot infer."""
    if self.training:
      return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps) * self.weight


class CALInference(nn.Module):
  """The CAL network at test time: one embedding per image of one modality.

  Built from a dict of hyper-parameters (the keys of `DEFAULT_CONFIG`; the
  names of `config.model` in cal_jax). State-dict names follow torchvision for
  the backbone (`layer3.1.conv2.weight`); the stem is `stem_visible.conv1...`
  and, with modality-specific stems, `stem_infrared.conv1...`; the DRM
  prototypes are `region_mining_{visible,infrared}.prototypes` (one DRM when
  shared); then `adapter.*` and `part_neck.*`.
  """

  def __init__(self, config: dict[str, Any] | None = None):
    super().__init__()
    unknown = sorted(set(config or {}) - set(DEFAULT_CONFIG))
    if unknown:
      raise ValueError(
        f'unknown CALInference hyper-parameters {unknown}; known: {sorted(DEFAULT_CONFIG)}'
      )
    self.config = {**DEFAULT_CONFIG, **(config or {})}
    c = self.config
    bad = [
      f'{key}={c[key]!r} (must be {what})'
      for key, (ok, what) in HYPERPARAMETER_CHECKS.items()
      if not ok(c[key])
    ]
    if bad:
      raise ValueError(f'invalid CALInference hyper-parameters: {", ".join(bad)}')
    kind, blocks_per_stage = ARCHITECTURES[c['depth']]
    block = Bottleneck if kind == 'bottleneck' else BasicBlock
    width = c['width']
    self.stem_visible = Stem(width)
    self.stem_infrared = Stem(width) if c['modality_specific_stem'] else None
    in_channels = width
    strides = (1, 2, 2, c['last_stride'])
    for stage, (num_blocks, stride) in enumerate(zip(blocks_per_stage, strides)):
      features = width * 2**stage
      self.add_module(
        f'layer{stage + 1}', make_stage(block, in_channels, features, num_blocks, stride)
      )
      in_channels = features * block.expansion
    self.channels = in_channels
    drm = lambda: RegionMining(in_channels, c['num_parts'], c['select_ratio'], c['pool_sizes'])
    self.region_mining_visible = drm()
    self.region_mining_infrared = None if c['shared_region_mining'] else drm()
    self.adapter = AttentionAdapter(
      in_channels, c['adapter_hidden'], c['adapter_dim'], c['channel_reduction']
    )
    self.part_neck = BNNeck(in_channels)

  @property
  def embedding_size(self) -> int:
    """N_p * C."""
    return self.config['num_parts'] * self.channels

  def feature_map(self, images: torch.Tensor, modality: int) -> torch.Tensor:
    """[B, 3, H, W] -> the last stage's map X [B, C, h, w]."""
    stem = self.stem_visible
    if modality == INFRARED and self.stem_infrared is not None:
      stem = self.stem_infrared
    x = stem(images)
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))

  def refined_parts(self, images: torch.Tensor, modality: int) -> dict[str, torch.Tensor]:
    """Self-refinement of one modality: 'features' f [B, N_p, C] (before the
    BNNeck), 'similarity' [B, N_p, h*w], 'scores' S and 'selected' S_hat [B, h*w, N_p]."""
    if modality not in (VISIBLE, INFRARED):
      raise ValueError(
        f'modality must be {VISIBLE} (visible) or {INFRARED} (infrared), got {modality!r}'
      )
    if images.ndim != 4 or images.shape[1] != 3:
      raise ValueError(f'images must be [B, 3, H, W] (NCHW RGB), got {tuple(images.shape)}')
    drm = self.region_mining_visible
    if modality == INFRARED and self.region_mining_infrared is not None:
      drm = self.region_mining_infrared
    mined = drm(self.feature_map(images, modality))
    features, similarity = self.adapter(mined['tokens'], mined['parts'])
    return {
      'features': features,
      'similarity': similarity,
      'scores': mined['scores'],
      'selected': mined['selected'],
    }

  def forward(self, images: torch.Tensor, modality: int) -> torch.Tensor:
    """Embeddings of images of one modality (VISIBLE or INFRARED).

    Args:
      images: [B, 3, H, W] float32, RGB normalised with the ImageNet mean and std.
      modality: VISIBLE (0) or INFRARED (1).
    Returns:
      [B, N_p * C]: the BNNeck part features, each part L2-normalised.
    """
    parts = self.refined_parts(images, modality)['features']
    parts = self.part_neck(parts)
    parts = parts * torch.rsqrt(torch.clamp(parts.square().sum(-1, keepdim=True), min=L2_EPSILON))
    return parts.flatten(1)


def similarity(visible: torch.Tensor, infrared: torch.Tensor) -> torch.Tensor:
  """sum_p cos(f_v,p, f_i,p) (Sec. 3.4): [N_v, N_p*C] x [N_i, N_p*C] -> [N_v, N_i]."""
  return visible @ infrared.T


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """{state-dict name: shape} of `CALInference(config)`, computed on torch's meta
  device: nothing the hyper-parameters ask for is allocated.

  Raises:
    ValueError: hyper-parameters `CALInference` refuses, or that no network has.
  """
  try:
    with torch.device('meta'):
      model = CALInference(config)
  except ValueError:
    raise
  except Exception as error:  # e.g. sizes torch cannot represent
    raise ValueError(
      f'hyper-parameters {config} give no network ({type(error).__name__}: '
      f'{(str(error).splitlines() or [""])[0][:200]})'
    ) from None
  return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_state(state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
  """Raises ValueError unless every tensor of `state` fills one of
  `CALInference(config)` and vice versa, with its shape (the count of batches
  a batch norm tracked may be absent)."""
  wanted = expected_shapes(config)
  optional = {name for name in wanted if name.endswith('num_batches_tracked')}
  missing = sorted(set(wanted) - set(state) - optional)
  unexpected = sorted(set(state) - set(wanted))
  reshaped = [
    f'{name}: {list(state[name].shape)} in the file, {list(wanted[name])} in the network'
    for name in sorted(set(state) & set(wanted))
    if tuple(state[name].shape) != wanted[name]
  ]
  if missing or unexpected or reshaped:
    raise ValueError(
      f'does not match CALInference({config}): '
      + '; '.join(
        part
        for part in (
          f'missing {missing[:8]}' if missing else '',
          f'unexpected {unexpected[:8]}' if unexpected else '',
          f'other shapes: {", ".join(reshaped[:4])}' if reshaped else '',
        )
        if part
      )
    )


def _check_image_size(metadata: dict[str, Any]) -> None:
  size = metadata.get('image_size', [1, 1])
  if not (
    isinstance(size, list)
    and len(size) == 2
    and all(
      isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_IMAGE_SIDE for s in size
    )
  ):
    raise ValueError(
      f"its 'image_size' metadata {size!r} is not [height, width] in pixels "
      f'(two integers from 1 to {MAX_IMAGE_SIDE})'
    )


def load(path: str, device: str = 'cpu') -> CALInference:
  """The model of an exported `.safetensors` or `.pt` file, in eval mode.

  Every tensor of the file must fill a tensor of the model and vice versa.
  The file's header is checked against its size (`read`), and its tensors'
  shapes against the network its metadata describes (`check_state`, on the
  meta device), before the network is built: what is then allocated is what
  the file holds. The file's metadata (M-hat, training identities, ...) is
  kept in `model.metadata`.
  """
  state, metadata = read(path)
  try:
    check_state(state, metadata['config'])
    _check_image_size(metadata)
    model = CALInference(metadata['config'])
    model.load_state_dict(state, strict=False)
  except (ValueError, RuntimeError) as error:
    raise WeightFileError(f'{path}: {str(error).splitlines()[-1].strip()}') from None
  model.metadata = metadata
  return model.to(device).eval()
