"""ResNet-18/34/50/101 in NHWC, laid out like torchvision's so weights map 1:1.

Module names follow torchvision's state-dict keys (`conv1`, `bn1`,
`layer3_1/conv2`, `layer2_0/downsample_conv`, ...), convolutions pad
explicitly and symmetrically as PyTorch does (never 'SAME', which pads a
stride-2 convolution of an even input by (0, 1) instead of (1, 1)), and batch
norm follows PyTorch's update rule (`batch_norm.BatchNorm`). The stride of the
last stage is configurable: ReID models keep it at 1 for larger maps.

The network is split into `Stem` (conv1, bn1, relu, maxpool) and `Stages`
(layer1..layer4) so that a model can give each modality its own stem, as the
AGW baseline does, and share the stages.

Mixed precision and rematerialisation (`config.model.dtype`, `.remat`):
`dtype` is the computation dtype of the convolutions (bfloat16 on an
accelerator; None: that of the inputs and parameters); parameters and
batch-norm statistics stay float32 and batch norm computes its moments in
float32. `Stages.remat` names the stages (1-4)
whose residual blocks are rematerialised with `nn.remat`: their activations
are recomputed in the backward pass instead of kept, and the parameter tree
is the same as without. With `remat_nested` (the default) each of those
stages is also rematerialised as a whole, around its checkpointed blocks: the
forward pass keeps only the stage's input, and the backward pass recomputes
the stage once (keeping its blocks' inputs) before each block's own
recomputation. One more forward pass, for much less memory (docs/decisions/model_and_losses.md).
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cal_jax.models.batch_norm import BatchNorm

# depth -> (block kind, blocks per stage)
ARCHITECTURES = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
  101: ('bottleneck', (3, 4, 23, 3)),
}

# torchvision initialises convolutions with kaiming_normal_(mode='fan_out').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def check_depth(depth: int) -> None:
  if depth not in ARCHITECTURES:
    raise ValueError(
      f'config.model.depth={depth} is not a supported ResNet depth; '
      f'choose one of {sorted(ARCHITECTURES)}.'
    )


def check_remat(stages: Sequence[int]) -> None:
  if any(s not in (1, 2, 3, 4) for s in stages):
    raise ValueError(
      f'config.model.remat={tuple(stages)} must name ResNet stages, each 1, 2, 3 or 4 '
      '(e.g. (3, 4), or () for none)'
    )


def block_expansion(depth: int) -> int:
  check_depth(depth)
  return 4 if ARCHITECTURES[depth][0] == 'bottleneck' else 1


def output_channels(depth: int, width: int = 64) -> int:
  """Channels of the last stage: 2048 for ResNet-50 at torchvision's width."""
  return width * 8 * block_expansion(depth)


def conv(
  features: int, kernel: int, stride: int = 1, name: str | None = None, dtype: Any = None
) -> nn.Conv:
  pad = (kernel - 1) // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=conv_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


class BasicBlock(nn.Module):
  """torchvision `BasicBlock`: two 3x3 convolutions."""

  features: int
  stride: int = 1
  downsample: bool = False
  axis_name: str | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(BatchNorm, use_running_average=not train, axis_name=self.axis_name)
    y = nn.relu(norm(name='bn1')(conv(self.features, 3, self.stride, 'conv1', self.dtype)(x)))
    y = norm(name='bn2')(conv(self.features, 3, 1, 'conv2', self.dtype)(y))
    if self.downsample:
      x = norm(name='downsample_bn')(
        conv(self.features, 1, self.stride, 'downsample_conv', self.dtype)(x)
      )
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """torchvision `Bottleneck` (v1.5: the stride sits on the 3x3 convolution)."""

  features: int
  stride: int = 1
  downsample: bool = False
  axis_name: str | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(BatchNorm, use_running_average=not train, axis_name=self.axis_name)
    y = nn.relu(norm(name='bn1')(conv(self.features, 1, 1, 'conv1', self.dtype)(x)))
    y = nn.relu(norm(name='bn2')(conv(self.features, 3, self.stride, 'conv2', self.dtype)(y)))
    y = norm(name='bn3')(conv(self.features * 4, 1, 1, 'conv3', self.dtype)(y))
    if self.downsample:
      x = norm(name='downsample_bn')(
        conv(self.features * 4, 1, self.stride, 'downsample_conv', self.dtype)(x)
      )
    return nn.relu(x + y)


class Stem(nn.Module):
  """conv1 (7x7, stride 2) -> bn1 -> relu -> maxpool (3x3, stride 2, pad 1)."""

  width: int = 64
  axis_name: str | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, 3] -> [B, H/4, W/4, width]."""
    x = conv(self.width, 7, 2, 'conv1', self.dtype)(x)
    x = BatchNorm(use_running_average=not train, axis_name=self.axis_name, name='bn1')(x)
    x = nn.relu(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Stages(nn.Module):
  """layer1 .. layer4 of a ResNet."""

  depth: int = 50
  width: int = 64
  last_stride: int = 1
  axis_name: str | None = None
  dtype: Any = None
  remat: Sequence[int] = ()  # stages (1-4) whose blocks are rematerialised
  remat_nested: bool = True  # each of those stages also rematerialised as a whole

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H/4, W/4, width] -> [B, H/16 (or /32), W/16 (or /32), output_channels]."""
    check_depth(self.depth)
    check_remat(self.remat)
    kind, blocks_per_stage = ARCHITECTURES[self.depth]
    plain_block = Bottleneck if kind == 'bottleneck' else BasicBlock
    # `train` (argument 2, counting the module) selects the batch-norm mode: static.
    remat_block = nn.remat(plain_block, static_argnums=(2,))
    expansion = block_expansion(self.depth)
    strides = (1, 2, 2, self.last_stride)

    def run_stage(module: nn.Module, x: jax.Array, stage: int) -> jax.Array:
      """The blocks of one stage, created in `module` (so named as without remat)."""
      num_blocks, stage_stride = blocks_per_stage[stage], strides[stage]
      features = self.width * 2**stage
      block_cls = remat_block if stage + 1 in self.remat else plain_block
      for index in range(num_blocks):
        stride = stage_stride if index == 0 else 1
        in_channels = x.shape[-1]
        needs_projection = index == 0 and (stride != 1 or in_channels != features * expansion)
        x = block_cls(
          features,
          stride,
          needs_projection,
          self.axis_name,
          self.dtype,
          name=f'layer{stage + 1}_{index}',
          parent=module,
        )(x, train)
      return x

    # Nested: the stage keeps only its input; its backward pass recomputes the stage
    # (keeping the blocks' inputs), then each block (one more forward pass in all).
    nested_stage = nn.remat(run_stage, static_argnums=(2,))
    for stage in range(len(blocks_per_stage)):
      nested = self.remat_nested and stage + 1 in self.remat
      x = (nested_stage if nested else run_stage)(self, x, stage)
    return x


class ResNet(nn.Module):
  """A torchvision ResNet without its pooling and classifier head.

  Attributes:
    depth: 18, 34, 50 or 101.
    width: stem channels (64 in torchvision; smaller for fast tests).
    last_stride: stride of layer4 (2 in torchvision, 1 in ReID models).
  """

  depth: int = 50
  width: int = 64
  last_stride: int = 2
  axis_name: str | None = None
  dtype: Any = None
  remat: Sequence[int] = ()
  remat_nested: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, 3] -> the last stage's feature map [B, h, w, C] (in `dtype`)."""
    x = Stem(self.width, self.axis_name, self.dtype, name='stem')(x, train)
    return Stages(
      self.depth,
      self.width,
      self.last_stride,
      self.axis_name,
      self.dtype,
      tuple(self.remat),
      self.remat_nested,
      name='stages',
    )(x, train)


def stage_names(depth: int) -> Sequence[str]:
  """Names of all residual blocks of a depth, in order ('layer1_0', ...)."""
  check_depth(depth)
  return [f'layer{s + 1}_{i}' for s, n in enumerate(ARCHITECTURES[depth][1]) for i in range(n)]
