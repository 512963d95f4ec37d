"""Import an ImageNet-pretrained torchvision ResNet (18/34/50/101) into cal_jax.

A torchvision state_dict (`.pth`/`.pt`, read with `torch.load(...,
weights_only=True)`, or `.safetensors`, read without torch) becomes the
variables of `cal_jax.models.resnet.ResNet`; nothing is downloaded. To get the
last stage's feature map of an NHWC batch `images` ([B, H, W, 3], RGB scaled to
[0, 1], normalised with the ImageNet mean and std as torchvision expects):

  from cal_jax.models.resnet import ResNet
  from cal_jax.models.torchvision_weights import load_torchvision_resnet

  variables = load_torchvision_resnet('resnet50.pth', 'resnet50')  # or .safetensors
  model = ResNet(depth=50, last_stride=1)
  feature_map = model.apply(variables, images)  # [B, H/16, W/16, 2048]

`apply_to_cal` puts the same weights into the stems and stages of a CAL model.

The conversion is data: `param_mapping` names, for every torchvision key,
the Flax collection and path it fills and the kind of tensor it is;
`TRANSPOSES` says how each kind is laid out (convolutions OIHW -> HWIO).
Every key of the file must be used (but `fc.*` and `num_batches_tracked`)
and every variable of the model filled, with the right shape; otherwise a
`CheckpointMismatchError` lists what differs and what to change.
"""

import functools
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cal_jax.models import resnet
from cal_jax.models import weight_files as file_checks

# config.model.pretrained's word for "no file: train the backbone from scratch, on purpose".
PRETRAINED_NONE = 'none'

ARCHS = {'resnet18': 18, 'resnet34': 34, 'resnet50': 50, 'resnet101': 101}

# Kind of tensor -> axis permutation from the torch layout to the Flax one.
TRANSPOSES = {
  'conv': (2, 3, 1, 0),  # OIHW -> HWIO
  'vector': (0,),
}

# (Flax collection, Flax leaf) -> (torchvision leaf, kind).
LEAVES = {
  ('params', 'kernel'): ('weight', 'conv'),
  ('params', 'scale'): ('weight', 'vector'),
  ('params', 'bias'): ('bias', 'vector'),
  ('batch_stats', 'mean'): ('running_mean', 'vector'),
  ('batch_stats', 'var'): ('running_var', 'vector'),
}

# Flax module names that torchvision spells differently (besides the blocks,
# 'layer2_0' -> 'layer2.0'); the top-level 'stem' and 'stages' have no name.
MODULES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}

# Order of the modules of a stem or block in a torchvision state_dict.
MODULE_ORDER = ('conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'downsample_conv', 'downsample_bn')

# torchvision keys that the backbone does not use.
IGNORED = re.compile(r'(^fc\.|(^|\.)num_batches_tracked$)')

MAX_LISTED = 8  # problems listed per kind in an error message


class CheckpointMismatchError(ValueError):
  """A checkpoint's keys or shapes differ from those the model expects."""


class UnsafeFileError(ValueError, pickle.UnpicklingError):
  """A .pth file holds objects other than tensors and plain containers: it is not
  unpickled, since unpickling them could run code."""


def torch_load_problem(path: str, error: BaseException) -> ValueError:
  """The error to raise for what `torch.load(path, weights_only=True)` raised:
  UnsafeFileError when the file names a global (a class or function) that the
  weights-only unpickler refuses, else WeightFileError (damaged, not torch).
  torch's own text, which suggests an unrestricted load, is not repeated."""
  text = str(error)
  offender = next((line.strip() for line in text.splitlines() if 'GLOBAL' in line), None)
  if offender:
    return UnsafeFileError(
      f'{path}: refused to load: the file holds objects other than tensors, whose '
      f'unpickling could run code ({offender.rstrip(".")}). Save a bare state_dict, or '
      '.safetensors.'
    )
  return file_checks.WeightFileError(
    f'{path}: not a readable torch file (damaged, truncated, or another format); save '
    'the state_dict again with torch.save, or as .safetensors'
  )


class Target(NamedTuple):
  """Where one torchvision tensor goes."""

  collection: str  # 'params' or 'batch_stats'
  path: tuple[str, ...]  # ('stages', 'layer1_0', 'conv1', 'kernel')
  kind: str  # a key of TRANSPOSES
  shape: tuple[int, ...]  # Flax shape


def torch_shape(target: Target) -> tuple[int, ...]:
  """The shape the tensor has in a torchvision state_dict."""
  inverse = np.argsort(TRANSPOSES[target.kind])
  return tuple(target.shape[i] for i in inverse)


@functools.cache
def param_mapping(depth: int, width: int = 64) -> dict[str, Target]:
  """torchvision key -> Target, for every variable of `ResNet(depth, width)`.

  In torchvision's order (stem, then blocks; conv1, bn1, ... within each).
  """
  resnet.check_depth(depth)
  blocks = list(resnet.stage_names(depth))
  modules = {**MODULES, **{name: name.replace('_', '.') for name in blocks}}
  shapes = jax.eval_shape(
    resnet.ResNet(depth=depth, width=width).init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
  )
  mapping = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in flax.traverse_util.flatten_dict(shapes[collection]).items():
      torch_leaf, kind = LEAVES[collection, path[-1]]
      key = '.'.join([modules.get(name, name) for name in path[1:-1]] + [torch_leaf])
      mapping[key] = Target(collection, path, kind, tuple(leaf.shape))
  order = lambda t: (
    blocks.index(t.path[1]) if t.path[0] == 'stages' else -1,
    MODULE_ORDER.index(t.path[-2]),
    list(LEAVES).index((t.collection, t.path[-1])),
  )
  return dict(sorted(mapping.items(), key=lambda item: order(item[1])))


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a `.pth`/`.pt` (torch, weights only) or `.safetensors` file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'pretrained checkpoint {path!r} does not exist '
      '(config.model.pretrained); nothing is downloaded: save a '
      "torchvision model's state_dict() there first."
    )
  suffix = os.path.splitext(path)[1].lower()
  if suffix == '.safetensors':
    try:
      from safetensors.numpy import load_file
    except ImportError as error:
      raise ImportError(
        f"{path}: reading .safetensors needs safetensors (pip install 'cal_jax[torch]')."
      ) from error
    file_checks.check_safetensors(path)  # sizes checked before anything is allocated
    try:
      return {key: np.array(value) for key, value in load_file(path).items()}
    except Exception as error:  # pylint: disable=broad-except  (safetensors' own error type)
      raise file_checks.WeightFileError(
        f'{path}: not a readable .safetensors file: {error}'
      ) from error
  if suffix not in ('.pth', '.pt'):
    raise ValueError(
      f'{path}: unknown checkpoint format {suffix!r}; expected a torchvision '
      'state_dict saved as .pth, .pt or .safetensors.'
    )
  try:
    import torch
  except ImportError as error:
    raise ImportError(
      f'{path}: reading a .pth checkpoint needs torch (pip install '
      "'cal_jax[torch]'); or convert it to .safetensors elsewhere."
    ) from error
  # weights_only: tensors and plain containers only, so no code in the file runs. A
  # zip-based file (torch >= 1.6) is checked first and memory-mapped, so that no size
  # it claims is allocated; torchvision's older .pth files are legacy pickles.
  is_zip = file_checks.check_torch_zip(path)
  try:
    state = torch.load(path, map_location='cpu', weights_only=True, mmap=is_zip)
  except (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OSError,
  ) as error:
    raise torch_load_problem(path, error) from error
  if not isinstance(state, Mapping):
    raise CheckpointMismatchError(
      f'{path}: holds a {type(state).__name__}, not a state_dict; '
      'save model.state_dict() of a torchvision ResNet.'
    )
  arrays = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      kind = 'dict' if isinstance(value, Mapping) else type(value).__name__
      raise CheckpointMismatchError(
        f'{path}: key {key!r} holds a {kind}, not a tensor: the file is not '
        "a bare state_dict (a training checkpoint?); save the model's state_dict() alone."
      )
    value = value.detach()
    value = value.to(torch.float32) if value.is_floating_point() else value
    arrays[key] = np.array(value.numpy())  # a copy: the file may be memory-mapped
  return arrays


def guess_architecture(state: Mapping[str, Any]) -> tuple[str, int] | None:
  """(arch, width) that a torchvision state_dict looks like, or None."""
  blocks = [set() for _ in range(4)]
  for key in state:
    match = re.match(r'layer([1-4])\.(\d+)\.', key)
    if match:
      blocks[int(match[1]) - 1].add(int(match[2]))
  kind = 'bottleneck' if any('.conv3.' in key for key in state) else 'basic'
  counts = tuple(len(b) for b in blocks)
  width = state['conv1.weight'].shape[0] if 'conv1.weight' in state else None
  for arch, depth in ARCHS.items():
    if resnet.ARCHITECTURES[depth] == (kind, counts) and width is not None:
      return arch, width
  return None


def _listed(lines: list[str]) -> list[str]:
  more = len(lines) - MAX_LISTED
  return lines[:MAX_LISTED] + ([f'  ... and {more} more'] if more > 0 else [])


def _mismatch_advice(state: Mapping[str, Any], arch: str, width: int) -> str:
  keys = list(state)
  if keys and all(key.startswith('module.') for key in keys):
    return (
      "Every key starts with 'module.' (saved from nn.DataParallel): strip that prefix "
      'and save the state_dict again.'
    )
  guess = guess_architecture(state)
  if guess is not None and guess != (arch, width):
    file_arch, file_width = guess
    return (
      f'The file looks like a {file_arch} checkpoint of width {file_width}: set '
      f'config.model.depth={ARCHS[file_arch]} and config.model.width={file_width}, '
      f'or use a {arch} checkpoint.'
    )
  return (
    f'Is this a {arch} checkpoint? config.model.depth={ARCHS[arch]} and '
    f"config.model.width={width} expect the state_dict of torchvision's {arch}"
    + ('' if width == 64 else f' at width {width}')
    + '.'
  )


def convert_state_dict(
  state: Mapping[str, np.ndarray], arch: str, width: int = 64, source: str = 'state_dict'
) -> dict[str, Any]:
  """torchvision tensors -> {'params', 'batch_stats'} of `ResNet(depth, width)`."""
  if arch not in ARCHS:
    raise ValueError(f'arch {arch!r} is not supported; choose one of {sorted(ARCHS)}.')
  mapping = param_mapping(ARCHS[arch], width)
  used = {key: value for key, value in state.items() if not IGNORED.search(key)}
  missing = [
    f'  missing key {key}: expected shape {torch_shape(t)}'
    for key, t in mapping.items()
    if key not in used
  ]
  unexpected = [
    f'  unexpected key {key}: found shape {tuple(np.shape(value))}'
    for key, value in used.items()
    if key not in mapping
  ]
  wrong = [
    f'  key {key}: expected shape {torch_shape(t)}, found {tuple(np.shape(used[key]))}'
    for key, t in mapping.items()
    if key in used and tuple(np.shape(used[key])) != torch_shape(t)
  ]
  if missing or unexpected or wrong:
    raise CheckpointMismatchError(
      '\n'.join(
        [
          f'{source}: does not match a torchvision {arch} of width {width} '
          f'({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shapes):'
        ]
        + _listed(wrong)
        + _listed(missing)
        + _listed(unexpected)
        + [_mismatch_advice(state, arch, width)]
      )
    )
  variables = {'params': {}, 'batch_stats': {}}
  for key, target in mapping.items():
    value = np.asarray(used[key], np.float32).transpose(TRANSPOSES[target.kind])
    variables[target.collection][target.path] = np.ascontiguousarray(value)
  return {
    collection: flax.traverse_util.unflatten_dict(flat) for collection, flat in variables.items()
  }


def torchvision_state_dict(variables: Mapping[str, Any], depth: int, width: int = 64) -> dict:
  """`convert_state_dict` backwards: {'params', 'batch_stats'} of `ResNet(depth, width)`
  -> {torchvision key: float32 array in the torch layout}, in torchvision's order."""
  flat = {
    collection: flax.traverse_util.flatten_dict(flax.core.unfreeze(variables[collection]))
    for collection in ('params', 'batch_stats')
  }
  state = {}
  for key, target in param_mapping(depth, width).items():
    value = np.asarray(flat[target.collection][target.path], np.float32)
    if value.shape != target.shape:
      raise CheckpointMismatchError(
        f'{"/".join(target.path)}: shape {value.shape}, a resnet{depth} of width {width} '
        f'has {target.shape}'
      )
    state[key] = np.ascontiguousarray(value.transpose(np.argsort(TRANSPOSES[target.kind])))
  return state


def load_torchvision_resnet(path: str, arch: str, *, width: int = 64) -> dict[str, Any]:
  """Reads a torchvision ResNet state_dict into `ResNet(depth=...)` variables.

  Args:
    path: a `.pth`/`.pt` file (read with `torch.load(weights_only=True)`) or
      a `.safetensors` file (read with numpy) holding `model.state_dict()`.
    arch: 'resnet18', 'resnet34', 'resnet50' or 'resnet101'.
    width: stem channels (64 for torchvision's networks).
  Returns:
    {'params': {'stem': ..., 'stages': ...}, 'batch_stats': {...}} of float32
    numpy arrays, for `ResNet(depth=ARCHS[arch], width=width)`.
  Raises:
    FileNotFoundError: `path` does not exist.
    CheckpointMismatchError (a ValueError): keys or shapes differ.
    UnsafeFileError (a ValueError and pickle.UnpicklingError): a .pth holds
      more than tensors (it is not run).
    file_checks.WeightFileError (a ValueError): a damaged file, or one of
      another format.
  """
  if arch not in ARCHS:
    raise ValueError(f'arch {arch!r} is not supported; choose one of {sorted(ARCHS)}.')
  return convert_state_dict(read_state_dict(path), arch, width, source=os.fspath(path))


def _describe(tree: Mapping[str, Any]) -> str:
  """'resnet50 of width 16' for a {'stem', 'stages'} params tree."""
  stages = tree.get('stages', {})
  counts = tuple(sum(name.startswith(f'layer{s}_') for name in stages) for s in range(1, 5))
  kind = 'bottleneck' if any('conv3' in block for block in stages.values()) else 'basic'
  arch = next(
    (a for a, d in ARCHS.items() if resnet.ARCHITECTURES[d] == (kind, counts)), 'unknown ResNet'
  )
  try:
    return f'{arch} of width {tree["stem"]["conv1"]["kernel"].shape[-1]}'
  except (KeyError, TypeError):
    return arch


def apply_to_cal(
  variables: Mapping[str, Any], backbone: Mapping[str, Any], *, modality_specific_stem: bool
) -> dict[str, Any]:
  """CAL variables with the backbone's stem(s) and stages.

  Args:
    variables: {'params', 'batch_stats', ...} of a `CAL` model.
    backbone: the output of `load_torchvision_resnet`.
    modality_specific_stem: as the CAL model was built; when True both
      'stem_visible' and 'stem_infrared' get the backbone's 'stem', when
      False the one shared 'stem_visible' does.
  Returns:
    A copy of `variables` (plain dicts) in which those subtrees are replaced;
    everything else (DRM, TSAA, classifiers) is kept.
  """
  variables = flax.core.unfreeze(variables)
  destinations = {'stem_visible': 'stem', 'stages': 'stages'}
  if modality_specific_stem:
    destinations['stem_infrared'] = 'stem'
  for collection in ('params', 'batch_stats'):
    model = variables[collection]
    if modality_specific_stem != ('stem_infrared' in model):
      raise CheckpointMismatchError(
        f'modality_specific_stem={modality_specific_stem} but the CAL variables '
        f"{'lack' if modality_specific_stem else 'have'} 'stem_infrared': pass the "
        'config.model.modality_specific_stem the model was built with.'
      )
    for name, source in destinations.items():
      expected = flax.traverse_util.flatten_dict(model[name])
      found = flax.traverse_util.flatten_dict(backbone[collection][source])
      problems = [
        f'  {name}/{"/".join(p)}: expected shape {tuple(expected[p].shape)}, '
        + (f'found {tuple(np.shape(found[p]))}' if p in found else 'missing')
        for p in expected
        if p not in found or np.shape(found[p]) != expected[p].shape
      ]
      problems += [
        f'  {source}/{"/".join(p)}: not in the CAL model' for p in found if p not in expected
      ]
      if problems:
        cal = {'stem': variables['params']['stem_visible'], 'stages': variables['params']['stages']}
        raise CheckpointMismatchError(
          '\n'.join(
            [
              f'{collection}: the backbone ({_describe(backbone["params"])}) does not fit '
              f'the CAL model ({_describe(cal)}):'
            ]
            + _listed(problems)
            + ['Set config.model.depth and config.model.width to those of the checkpoint.']
          )
        )
      model[name] = flax.traverse_util.unflatten_dict(
        {p: jnp.asarray(found[p], expected[p].dtype) for p in expected}
      )
  return variables
