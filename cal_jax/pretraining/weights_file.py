"""The pretrained file: a torchvision ResNet state dict, and the record of its inputs.

`write` saves the backbone as `torchvision.models.resnet<depth>(num_classes=C)
.state_dict()` would hold it at the config's width (the keys and layouts of
`torchvision_weights.param_mapping`, plus `fc.weight` [C, channels] and `fc.bias`
of the category classifier), as .safetensors, so that `config.model.pretrained`
loads it through the loader ImageNet weights go through. Beside it, OUTPUT.json
records the hash of the inputs (the pretraining config and `GENERATOR_VERSION`),
the config, the loss and accuracy curve and the wall time: a run whose inputs hash
to the recorded one, with the file present, has nothing to do (`is_up_to_date`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import ml_collections
import numpy as np

from cal_jax.models import torchvision_weights
from cal_jax.pretraining import fractals


def check_output(output: str) -> None:
  """Refuses, before anything is trained, an output that `write` could not write."""
  if not output.endswith('.safetensors'):
    raise ValueError(f'--output {output!r} must end with .safetensors')
  if os.path.isdir(output):
    raise IsADirectoryError(f'--output {output!r} is a folder; name the .safetensors file')


def sidecar(output: str) -> str:
  return output + '.json'


def inputs_hash(config: ml_collections.ConfigDict) -> str:
  """sha256 of the config and the generator's version: what the file depends on."""
  inputs = {'config': config.to_dict(), 'generator_version': fractals.GENERATOR_VERSION}
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def is_up_to_date(output: str, digest: str) -> bool:
  """The file exists and its record names the same inputs."""
  if not (os.path.isfile(output) and os.path.isfile(sidecar(output))):
    return False
  try:
    with open(sidecar(output), encoding='utf-8') as f:
      return json.load(f).get('inputs_hash') == digest
  except (OSError, ValueError):
    return False


def state_dict(backbone: dict, fc: dict, depth: int, width: int) -> dict[str, np.ndarray]:
  """torchvision keys -> float32 arrays: the backbone by the loader's table, then fc."""
  state = torchvision_weights.torchvision_state_dict(backbone, depth, width)
  state['fc.weight'] = np.ascontiguousarray(np.asarray(fc['kernel'], np.float32).T)
  state['fc.bias'] = np.asarray(fc['bias'], np.float32)
  return state


def write(
  output: str,
  state: dict[str, np.ndarray],
  config: ml_collections.ConfigDict,
  curve: list,
  wall_seconds: float,
) -> None:
  """Saves `state` to `output` (.safetensors) and its record, each written whole
  to a temporary name first, the record last: a run cut short leaves no record."""
  from safetensors.numpy import save_file

  check_output(output)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  if os.path.exists(sidecar(output)):
    os.remove(sidecar(output))
  save_file(state, output + '.tmp')
  os.replace(output + '.tmp', output)
  record = {
    'inputs_hash': inputs_hash(config),
    'generator_version': fractals.GENERATOR_VERSION,
    'config': config.to_dict(),
    'wall_seconds': round(wall_seconds, 1),
    'curve': [dataclasses.asdict(r) for r in curve],
  }
  with open(sidecar(output) + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1)
  os.replace(sidecar(output) + '.tmp', sidecar(output))
