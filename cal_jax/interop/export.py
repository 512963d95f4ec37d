"""Export a trained CAL checkpoint for PyTorch (`cal_jax.interop.torch_model`).

`export_checkpoint` is what `python -m cal_jax.convert` calls. An existing
output file is replaced only with `overwrite`; an output that is a folder,
lies under a file or on a disk that cannot be written is refused before the
checkpoint is read.

The config comes from the workdir's `config.json` (written by training), or
is given (`--config`, with --config.FIELD=VALUE overrides, as `cal_jax.main`). Only
the inference path is written: stems, layer1..layer4, the DRM prototypes,
the TSAA and the part BNNeck. The training-only parts (identity classifiers,
part classifiers Phi_k, the global BNNeck) are left out. The visible DRM
prototypes are reordered by M-hat, the most frequent part matching of the
last training epoch, exactly as `--mode eval` does before embedding.

The conversion is data: the backbone's names and layouts are
`cal_jax.models.torchvision_weights`' table (`param_mapping`, `TRANSPOSES`)
read backwards, the head's are `HEAD_MODULES` and `HEAD_LEAVES` below, and
`TO_TORCH` says how each kind of tensor is laid out in PyTorch.

A `.safetensors` file keeps the metadata (the network's hyper-parameters,
M-hat, ...) as JSON strings and is written without torch; a `.pt` file is a
dict {'config', 'state_dict', 'metadata'} of tensors and plain values, which
`torch.load(path, weights_only=True)` reads.
"""

import errno
import json
import os
import tempfile
from typing import Any

import flax
import ml_collections
import numpy as np

from cal_jax.config import checks as config_checks
from cal_jax.config import run_config
from cal_jax.evaluation import embedding
from cal_jax.models import torchvision_weights as pretrained
from cal_jax.runtime import workdir as workdir_lib
from cal_jax.training import checkpointing
from cal_jax.training.assignments import AssignmentCounts
from cal_jax.training.state import abstract_train_state

FORMAT = 'cal_jax.torch_model/1'  # the format `cal_jax.interop.torch_model.load` reads
TORCH_SUFFIXES = ('.safetensors', '.pt')  # what `torch_model.load` reads
SUFFIXES = (*TORCH_SUFFIXES, '.onnx')

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


class OutputError(OSError):
  """The output file cannot be written where --output names it."""

  def __str__(self) -> str:
    return str(self.strerror)  # the message, without OSError's "[Errno N]"


def check_suffix(path: str) -> str:
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  if suffix not in SUFFIXES:
    raise ValueError(
      f'{path}: unknown output format {suffix!r}; name the file *.safetensors, *.pt or *.onnx'
    )
  return suffix


def check_output(path: str, overwrite: bool = False) -> None:
  """Refuses an output that cannot be written, before any work is done.

  Raises:
    OutputError: `path` is a folder, exists (and not `overwrite`), lies under
      a file, or its disk refuses a write (read-only, no permission).
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    raise OutputError(
      errno.EISDIR,
      f'--output {path!r} is a folder: name the file to write, '
      f'e.g. {os.path.join(path, "cal.safetensors")!r}',
    )
  if os.path.lexists(path) and not overwrite:
    raise OutputError(
      errno.EEXIST,
      f'--output {path!r} exists: pass --overwrite to replace it, or choose another --output',
    )
  existing = os.path.dirname(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise OutputError(
      errno.ENOTDIR,
      f'cannot write --output {path!r}: {existing!r} is a file, '
      'not a folder; choose another --output',
    )
  try:
    fd, probe = tempfile.mkstemp(prefix='.write-probe-', dir=existing)
    os.close(fd)
    os.remove(probe)
  except OSError as error:
    raise OutputError(
      error.errno,
      f'cannot write --output {path!r}: {error.strerror} '
      f'(in {existing!r}); choose another --output',
    ) from error


def check_modality(modality: str) -> None:
  from cal_jax.interop.onnx_export import MODALITIES

  if modality not in MODALITIES:
    raise ValueError(f'--modality {modality!r}: choose one of {", ".join(MODALITIES)}')


def check_embedding(config: ml_collections.ConfigDict) -> None:
  """Refuses a run evaluated with another embedding than CAL's parts."""
  embedding = config.model.embedding
  if embedding != 'parts':
    raise ValueError(
      f'config.model.embedding={embedding!r}: only the CAL part embedding '
      "('parts', Sec. 3.4) is exported, not the baseline's pooled feature"
    )


def export(
  variables: Any,
  config: ml_collections.ConfigDict,
  num_classes: int | None,
  path: str,
  *,
  m_hat: np.ndarray | None = None,
  extra_metadata: dict[str, Any] | None = None,
  overwrite: bool = False,
  modality: str = 'both',
) -> dict[str, Any]:
  """Writes the inference weights of trained CAL variables for `torch_model.load`.

  Args:
    variables: {'params', 'batch_stats'} of the trained `CAL` of `config`,
      prototypes in training order.
    config: the run's config (its `config.model` and image size are used).
    num_classes: training identities, recorded in the metadata (or None).
    path: the output, `*.safetensors` or `*.pt`; written atomically.
    m_hat: M-hat [N_p] (infrared part k <-> visible part M[k]); the visible
      prototypes are reordered by it (unless the DRM is shared, as
      `cal_jax.evaluation.run.inference_variables`). None: the identity.
    extra_metadata: more JSON values for the metadata (e.g. the step).
    overwrite: replace `path` if it exists (else OutputError).
    modality: for `*.onnx`, the graph's inputs: 'both', 'visible' or
      'infrared' (`cal_jax.interop.onnx_export`); the other formats hold both.
  Returns:
    The metadata written: 'format', 'config', 'm_hat', 'num_classes',
    'image_size', and `extra_metadata`.
  """
  suffix = check_suffix(path)
  check_modality(modality)
  check_output(path, overwrite)
  check_embedding(config)
  hyper = model_hyperparameters(config)
  num_parts = hyper['num_parts']
  m_hat = np.arange(num_parts) if m_hat is None else np.asarray(m_hat)
  params = variables['params']
  if not hyper['shared_region_mining']:
    params = embedding.reorder_prototypes(params, m_hat)
  state = torch_state_dict(
    {'params': params, 'batch_stats': variables['batch_stats']}, hyper['depth'], hyper['width']
  )
  metadata = {
    'format': FORMAT,
    'config': hyper,
    'm_hat': [int(i) for i in m_hat],
    'prototypes_reordered': not hyper['shared_region_mining'],
    'num_classes': None if num_classes is None else int(num_classes),
    'image_size': [int(config.data.image_height), int(config.data.image_width)],
    **checkpointing.to_json(extra_metadata or {}),
  }
  directory = os.path.dirname(os.path.abspath(path))
  temporary = os.path.join(directory, f'.{os.path.basename(path)}.tmp{os.getpid()}')
  try:
    os.makedirs(directory, exist_ok=True)
    if suffix == '.safetensors':
      from safetensors.numpy import save_file

      save_file(state, temporary, metadata={k: json.dumps(v) for k, v in metadata.items()})
    elif suffix == '.onnx':
      _write_onnx(state, metadata, temporary, modality)
    else:
      try:
        import torch
      except ImportError as error:
        raise ImportError(
          f"{path}: writing .pt needs torch (pip install 'cal_jax[torch]'); .safetensors does not."
        ) from error
      torch.save(
        {
          'config': hyper,
          'metadata': metadata,
          'state_dict': {k: torch.tensor(v) for k, v in state.items()},
        },
        temporary,
      )
    os.chmod(temporary, workdir_lib.plain_file_mode())  # as the run's other files, not 0600
    os.replace(temporary, path)
  except OSError as error:  # e.g. the disk filled up: the old file (if any) is kept
    if isinstance(error, OutputError):
      raise
    raise OutputError(
      error.errno, f'cannot write --output {path!r}: {error.strerror or error}'
    ) from error
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return metadata


def _writable(array: np.ndarray) -> np.ndarray:
  """`array` C-contiguous, copied where it is read-only (as the numpy view of a JAX
  array is): `torch.from_numpy` shares the memory, and warns on a read-only array."""
  array = np.ascontiguousarray(array)
  return array if array.flags.writeable else array.copy()


def _write_onnx(state: dict[str, np.ndarray], metadata: dict[str, Any], path: str, modality: str):
  """The PyTorch inference module of `state`, traced to ONNX (`onnx_export`)."""
  try:
    import onnx  # noqa: F401
    import torch
  except ImportError as error:
    raise ImportError(
      f"{path}: writing .onnx needs torch and onnx (pip install 'cal_jax[onnx]')"
    ) from error
  from cal_jax.interop import onnx_export, torch_model

  net = torch_model.CALInference(metadata['config'])
  missing, unexpected = net.load_state_dict(
    {k: torch.from_numpy(_writable(v)) for k, v in state.items()}, strict=False
  )
  missing = [k for k in missing if not k.endswith('num_batches_tracked')]
  if missing or unexpected:  # a mapping error of this module, not the user's
    raise RuntimeError(f'export tensors do not fill CALInference: {missing} {unexpected}')
  onnx_export.write(net.eval(), path, tuple(metadata['image_size']), metadata, modality)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run wrote to DIR/config.json, completed from the defaults."""
  return run_config.read_workdir_config(workdir, "pass the run's --config instead")


def checkpoint_step(directory: str, step: int | None) -> int:
  """`step` if it is a committed checkpoint of `directory`, else the latest (step None)."""
  steps = checkpointing.committed_steps(directory)
  if not steps:
    raise FileNotFoundError(f'no complete checkpoint in {directory}: train first')
  if step is not None and step not in steps:
    raise FileNotFoundError(
      f'no checkpoint for step {step} in {directory}; the committed steps are {steps}'
    )
  return steps[-1] if step is None else step


def restore_for_inference(
  directory: str, config: ml_collections.ConfigDict, step: int | None
) -> tuple[Any, np.ndarray, int]:
  """(train state, M-hat, training identities) of a checkpoint, without its data set.

  `step` None: the latest intact step (a damaged newer one is named in a warning).
  M-hat is computed as `--mode eval` does: from the last epoch's assignment counts,
  or the current epoch's when no epoch has ended.
  """
  num_classes = _num_classes(directory, step)
  with checkpointing.Checkpointer(
    directory, config, num_classes, async_save=False, read_only=True
  ) as ckpt:
    state, extra = ckpt.restore(abstract_train_state(config, num_classes), step=step)
  return state, AssignmentCounts.from_json(extra, config.model.num_parts).m_hat(), num_classes


def _num_classes(directory: str, step: int | None) -> int:
  """The training identities of the run, from the meta item of `step` (None: of the
  newest step whose meta item is readable; every step of a run has the same)."""
  steps = [step] if step is not None else checkpointing.committed_steps(directory)[::-1]
  for candidate in steps:
    try:
      return int(checkpointing.saved_meta(directory, candidate)['fingerprint']['num_classes'])
    except Exception:  # a damaged meta item: named when the step is restored
      if candidate == steps[-1]:
        raise checkpointing.DamagedCheckpointError(
          f'no checkpoint in {directory} has a readable meta item '
          f'({os.path.join(directory, str(candidate), "meta")}); restore the folder from a copy'
        ) from None
  raise FileNotFoundError(f'no complete checkpoint in {directory}: train first')


def export_checkpoint(
  workdir: str,
  output: str,
  *,
  step: int | None = None,
  config: ml_collections.ConfigDict | None = None,
  overwrite: bool = False,
  modality: str = 'both',
) -> dict[str, Any]:
  """Exports a checkpoint of a training workdir (the latest, or `step`).

  M-hat is computed as `--mode eval` does: from the last epoch's assignment
  counts, or the current epoch's when no epoch has ended.
  Returns the metadata written (with 'checkpoint_step').
  """
  check_suffix(output)
  check_modality(modality)
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'workdir {workdir} does not exist')
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f'no checkpoints in {workdir} (no {directory}): train first, or '
      'point --workdir at a training run'
    )
  config = load_workdir_config(workdir) if config is None else config
  # Partial: no data is read here, so the data set's folder need not exist.
  config_checks.check_config(config, partial=True)
  check_embedding(config)
  checkpoint_step(directory, step)  # one exists (and `step`, if given)
  check_output(output, overwrite)  # before the checkpoint is read
  state, m_hat, num_classes = restore_for_inference(directory, config, step)
  step = int(state.step)  # without `step`: the latest intact one
  return export(
    {'params': state.params, 'batch_stats': state.batch_stats},
    config,
    num_classes,
    output,
    m_hat=m_hat,
    extra_metadata={'checkpoint_step': step},
    overwrite=overwrite,
    modality=modality,
  )
