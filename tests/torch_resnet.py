"""A plain-torch ResNet with torchvision's architecture and state-dict names.

The reference that imported and exported weights are tested against. It
reproduces `torchvision.models.resnet` (v1.5 bottleneck: the stride on the
3x3 convolution; conv1 7x7 stride 2 padding 3; max pool 3x3 stride 2
padding 1; layer1..layer4; avgpool and fc) with two additions for tests and
ReID: `width` (stem channels, 64 in torchvision) and `last_stride` (stride
of layer4, 2 in torchvision). `features` returns the last stage's map
[B, C, h, w], which `cal_jax.models.resnet.ResNet` returns as [B, h, w, C].
"""

import torch
from torch import nn

# arch -> (block kind, blocks per stage), as torchvision's resnet18 .. resnet101.
ARCHITECTURES = {
  'resnet18': ('basic', (2, 2, 2, 2)),
  'resnet34': ('basic', (3, 4, 6, 3)),
  'resnet50': ('bottleneck', (3, 4, 6, 3)),
  'resnet101': ('bottleneck', (3, 4, 23, 3)),
}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions and an identity (or projected) shortcut."""

  expansion = 1

  def __init__(
    self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
  ):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 x4, and a shortcut."""

  expansion = 4

  def __init__(
    self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
  ):
    super().__init__()
    self.conv1 = conv1x1(inplanes, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = conv1x1(planes, planes * self.expansion)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class ResNet(nn.Module):
  """torchvision's ResNet; `features` stops before the average pool."""

  def __init__(
    self, arch: str = 'resnet50', width: int = 64, last_stride: int = 2, num_classes: int = 1000
  ):
    super().__init__()
    kind, layers = ARCHITECTURES[arch]
    block: type[BasicBlock | Bottleneck] = Bottleneck if kind == 'bottleneck' else BasicBlock
    self.inplanes = width
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, width, layers[0])
    self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
    self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
    self.layer4 = self._make_layer(block, width * 8, layers[3], stride=last_stride)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

  def _make_layer(
    self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
  ) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
        conv1x1(self.inplanes, planes * block.expansion, stride),
        nn.BatchNorm2d(planes * block.expansion),
      )
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def features(self, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> the last stage's map [B, C, h, w]."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def randomize_(
  model: nn.Module, seed: int = 0, image_size: tuple[int, int] = (64, 32)
) -> nn.Module:
  """Gives every weight and every BatchNorm running statistic a random value.

  Convolution weights are scaled by fan-in. Running statistics are first
  measured on random images (so that eval-mode activations stay O(1) through
  the residual stages and an absolute tolerance means something), then
  perturbed: means shifted by noise, variances scaled by U(0.5, 1.5), so they
  stay positive. Returns `model` in eval mode, for chaining.
  """
  generator = torch.Generator().manual_seed(seed)
  randn = lambda *shape: torch.randn(shape, generator=generator)
  batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        module.weight.copy_(randn(*module.weight.shape) * (2.0 / module.weight[0].numel()) ** 0.5)
        if module.bias is not None:
          module.bias.copy_(0.1 * randn(*module.bias.shape))
    for bn in batch_norms:
      bn.weight.copy_(1.0 + 0.2 * randn(bn.num_features))
    for block in model.modules():
      if isinstance(block, (BasicBlock, Bottleneck)):
        # Residual branches that add small updates, as in a trained ResNet.
        closing = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        closing.weight.mul_(0.2)
    for bn in batch_norms:
      bn.bias.copy_(0.2 * randn(bn.num_features))
      bn.reset_running_stats()
      bn.momentum = None  # a cumulative average over the calibration batches
    model.train()
    for _ in range(2):
      model.features(randn(8, 3, *image_size))
    for bn in batch_norms:
      bn.momentum = 0.1
      bn.running_mean.add_(0.1 * bn.running_var.sqrt() * randn(bn.num_features))
      bn.running_var.mul_(0.5 + torch.rand(bn.num_features, generator=generator))
      bn.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=generator)))
  return model.eval()
