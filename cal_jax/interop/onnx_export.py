"""ONNX export of CAL's inference path: `python -m cal_jax.convert --output cal.onnx`.

The graph is that of the exported PyTorch module (`torch_model.CALInference`,
tested against JAX to 1e-6), traced by torch's TorchScript ONNX exporter
(opset 17). That route needs nothing beyond torch and onnx, reuses the one
inference path that is already checked against JAX, and gives the same
graph a PyTorch user would export themselves; jax2onnx would be a second
conversion of the same network to keep in step.

The batch axis is dynamic; the image size is fixed (the DRM's N_k depends on
the number of tokens) and recorded in the metadata. With ``modality='both'``
the graph has two inputs, ``visible`` and ``infrared`` [B, 3, H, W], and two
outputs, ``visible_embedding`` and ``infrared_embedding`` [B, N_p * C]; with
one modality, ``images`` -> ``embedding``. Inputs are RGB normalised with the
ImageNet mean and std, NCHW, float32, as `torch_model.CALInference` takes
them. The ONNX metadata_props hold the export's metadata as JSON strings
(format, config, m_hat, image_size, modality, checkpoint_step).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

MODALITIES = ('both', 'visible', 'infrared')
OPSET = 17


def write(
  net: Any, path: str, image_size: tuple[int, int], metadata: dict[str, Any], modality: str
) -> None:
  """Traces `net` (a `torch_model.CALInference` in eval mode) to an ONNX file at `path`."""
  import onnx
  import torch

  from cal_jax.interop import torch_model

  if modality not in MODALITIES:
    raise ValueError(f'--modality {modality!r}: choose one of {", ".join(MODALITIES)}')
  height, width = image_size
  example = torch.zeros(2, 3, height, width)
  if modality == 'both':
    module = _Both(net)
    inputs, outputs = ('visible', 'infrared'), ('visible_embedding', 'infrared_embedding')
    args = (example, example)
  else:
    module = _One(net, torch_model.VISIBLE if modality == 'visible' else torch_model.INFRARED)
    inputs, outputs = ('images',), ('embedding',)
    args = (example,)
  batch = {0: 'batch'}
  # The tracer's warnings name Python ints (N_k, sqrt(d)) that are constants of the
  # fixed image size, which is what the graph is for.
  with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter('ignore', torch.jit.TracerWarning)
    torch.onnx.export(
      module.eval(),
      args,
      path,
      input_names=list(inputs),
      output_names=list(outputs),
      dynamic_axes={name: batch for name in inputs + outputs},
      opset_version=OPSET,
      dynamo=False,
    )
  graph = onnx.load(path)
  del graph.metadata_props[:]
  for key, value in {**metadata, 'modality': modality}.items():
    entry = graph.metadata_props.add()
    entry.key, entry.value = key, json.dumps(value)
  onnx.save(graph, path)


def read_metadata(path: str) -> dict[str, Any]:
  """The metadata an exported .onnx file carries (JSON values)."""
  import onnx

  graph = onnx.load(path, load_external_data=False)
  return {entry.key: json.loads(entry.value) for entry in graph.metadata_props}


def _module_classes():
  import torch

  class Both(torch.nn.Module):
    def __init__(self, net):
      super().__init__()
      self.net = net

    def forward(self, visible, infrared):
      return self.net(visible, 0), self.net(infrared, 1)

  class One(torch.nn.Module):
    def __init__(self, net, modality: int):
      super().__init__()
      self.net = net
      self.modality = modality

    def forward(self, images):
      return self.net(images, self.modality)

  return Both, One


def _Both(net):  # noqa: N802  (a class made on first use: torch is optional for cal_jax)
  return _module_classes()[0](net)


def _One(net, modality: int):  # noqa: N802
  return _module_classes()[1](net, modality)
