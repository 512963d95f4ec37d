"""The CAL variables under PyTorch's names and layouts: what `torch_model.CALInference`
holds, mapped from the Flax tree.

  MODEL_FIELDS                      config.model fields that are CALInference's hyper-parameters
  model_hyperparameters(config)     those fields as JSON values; ablation variants refused
  torch_state_dict(variables, depth, width)   {torch key: float32 array}, torch layouts
"""

from typing import Any

import flax
import ml_collections
import numpy as np

from cal_jax.models import torchvision_weights as pretrained
from cal_jax.training import checkpointing

# config.model fields that are the hyper-parameters of `torch_model.CALInference`.
MODEL_FIELDS = (
  'depth',
  'width',
  'last_stride',
  'modality_specific_stem',
  'shared_region_mining',
  'num_parts',
  'select_ratio',
  'pool_sizes',
  'adapter_hidden',
  'adapter_dim',
  'channel_reduction',
)

# Kind of tensor -> axis permutation from the Flax layout to the torch one.
TO_TORCH = {
  'conv': tuple(int(i) for i in np.argsort(pretrained.TRANSPOSES['conv'])),  # HWIO -> OIHW
  'dense': (1, 0),  # Dense kernel [in, out] -> Linear weight [out, in]
  'vector': (0,),
}

# CAL backbone module -> (its torch prefix, the `resnet.ResNet` module whose
# torchvision names `pretrained.param_mapping` gives).
BACKBONE_MODULES = {
  'stem_visible': ('stem_visible.', 'stem'),
  'stem_infrared': ('stem_infrared.', 'stem'),
  'stages': ('', 'stages'),
}

# CAL head module path -> torch module name.
HEAD_MODULES = {
  ('region_mining_visible', 'prototypes'): 'region_mining_visible.prototypes',
  ('region_mining_infrared', 'prototypes'): 'region_mining_infrared.prototypes',
  **{
    ('adapter', mlp, fc): f'adapter.{mlp}.{fc}'
    for mlp in ('token_mlp', 'query_mlp', 'channel_mlp')
    for fc in ('fc1', 'fc2')
  },
  ('part_neck',): 'part_neck',
}

# (Flax collection, Flax leaf) of a head module -> (torch leaf, kind).
HEAD_LEAVES = {
  ('params', 'kernel'): ('weight', 'dense'),
  ('params', 'bias'): ('bias', 'vector'),
  ('params', 'scale'): ('weight', 'vector'),
  ('batch_stats', 'mean'): ('running_mean', 'vector'),
  ('batch_stats', 'var'): ('running_var', 'vector'),
}

# CAL module paths that only training uses: not exported.
TRAINING_ONLY = (
  ('global_neck',),
  ('global_classifier',),
  ('part_classifier',),
  ('part_classifiers',),  # config.model.id_classifier = 'per_part'
  ('region_mining_visible', 'part_classifiers'),
  ('region_mining_infrared', 'part_classifiers'),
  ('class_centers',),  # Table 4's center loss and ICA
  ('camera_centers',),  # Table 4's CCA
)


# Ablation variants of the network (Table 4's, and those of
# docs/decisions/model_and_losses.md): trained and evaluated here, not exported.
NOT_EXPORTED = {
  'part_queries': 'drm',
  'attention_similarity': 'tsaa',
  'channel_attention': True,
  'attention_border': 0,
  'attention_centring': False,
}


def model_hyperparameters(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.model` fields of the exported network, as plain JSON values."""
  for name, exported in NOT_EXPORTED.items():
    if config.model.get(name, exported) != exported:
      raise ValueError(
        f'config.model.{name}={config.model[name]!r} is an ablation '
        f'variant (Table 4, docs/decisions/model_and_losses.md); the PyTorch export covers CAL '
        f'itself ({name}={exported!r})'
      )
  return {name: checkpointing.to_json(config.model[name]) for name in MODEL_FIELDS}


def _startswith(path: tuple[str, ...], prefixes: tuple[tuple[str, ...], ...]) -> bool:
  return any(path[: len(prefix)] == prefix for prefix in prefixes)


def torch_state_dict(variables: Any, depth: int, width: int) -> dict[str, np.ndarray]:
  """Inference tensors of CAL `variables` under torch names, in torch layouts.

  Args:
    variables: {'params', 'batch_stats'} of a `CAL(depth=depth, width=width)`.
  Returns:
    {torch key: float32 array}, backbone first, in `torch_model.CALInference`
    names ('stem_visible.conv1.weight', 'layer1.0.conv1.weight', ...,
    'part_neck.running_var').
  Raises:
    ValueError: a variable that no rule names, or a backbone shape that
      differs from `pretrained.param_mapping(depth, width)`.
  """
  backbone = {
    (t.collection, t.path): (key, t) for key, t in pretrained.param_mapping(depth, width).items()
  }
  state, problems = {}, []
  for collection in ('params', 'batch_stats'):
    for path, value in flax.traverse_util.flatten_dict(dict(variables[collection])).items():
      if _startswith(path, TRAINING_ONLY):
        continue
      name = '/'.join((collection,) + path)
      value = np.asarray(value, np.float32)
      if path[0] in BACKBONE_MODULES:
        prefix, resnet_module = BACKBONE_MODULES[path[0]]
        found = backbone.get((collection, (resnet_module,) + path[1:]))
        if found is None:
          problems.append(f'  {name}: not a torchvision ResNet variable')
          continue
        key, target = found
        if value.shape != target.shape:
          problems.append(
            f'  {name}: shape {value.shape}, a resnet{depth} of width {width} has {target.shape}'
          )
          continue
        key, kind = prefix + key, target.kind
      elif path[:-1] in HEAD_MODULES and (collection, path[-1]) in HEAD_LEAVES:
        leaf, kind = HEAD_LEAVES[collection, path[-1]]
        key = f'{HEAD_MODULES[path[:-1]]}.{leaf}'
      else:
        problems.append(f'  {name}: no export rule (add it to HEAD_MODULES or TRAINING_ONLY)')
        continue
      state[key] = np.ascontiguousarray(value.transpose(TO_TORCH[kind]))
  if problems:
    raise ValueError('cannot export the CAL variables:\n' + '\n'.join(problems))
  return state
