"""Reading a file exported by `cal_jax.convert` (torch and the standard library only).

`read(path)` gives (state_dict, metadata) of a `.safetensors` or `.pt` file.
Nothing in the file runs (`torch.load(weights_only=True)`), and every size it
claims is checked against the file before anything is allocated
(`check_safetensors`, `check_torch_zip`); a bad file ends in one
`WeightFileError` naming it. Copied beside `torch_model.py`, it needs nothing
else of cal_jax (`cal_jax/models/weight_files.py` makes the same checks for the
ImageNet import, with its own advice).
"""

import json
import math
import os
import pickle
import struct
import zipfile
from typing import Any

import torch

FORMAT = 'cal_jax.torch_model/1'  # written by cal_jax.convert, checked by `load`

# safetensors' own limit on its JSON header; bytes per element of its dtypes.
MAX_HEADER_BYTES = 100 * 2**20
SAFETENSORS_DTYPE_BYTES = {
  'BOOL': 1,
  'U8': 1,
  'I8': 1,
  'F8_E4M3': 1,
  'F8_E5M2': 1,
  'U16': 2,
  'I16': 2,
  'F16': 2,
  'BF16': 2,
  'U32': 4,
  'I32': 4,
  'F32': 4,
  'U64': 8,
  'I64': 8,
  'F64': 8,
}


class WeightFileError(ValueError):
  """An exported file that is damaged, unsafe, or not written by cal_jax.convert."""


def check_safetensors(path: str) -> None:
  """Raises WeightFileError unless the header of a .safetensors file is consistent:
  its length, its JSON, and every tensor's dtype, shape and byte range within the
  file, all checked before anything the file claims is allocated."""
  size = os.path.getsize(path)
  bad = lambda why: WeightFileError(
    f'{path}: not a valid .safetensors file ({why}); write it again with python -m cal_jax.convert'
  )
  with open(path, 'rb') as f:
    start = f.read(8)
    if len(start) < 8:
      raise bad(f'{size} bytes, shorter than the 8-byte header length')
    length = struct.unpack('<Q', start)[0]
    if length > min(size - 8, MAX_HEADER_BYTES):
      raise bad(f'its header claims {length} bytes, the file has {size - 8} after the length')
    raw = f.read(length)
  try:
    header = json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise bad(f'its header is not JSON: {error}') from None
  if not isinstance(header, dict):
    raise bad('its header is not a JSON object')
  data_bytes = size - 8 - length
  metadata = header.pop('__metadata__', {}) or {}
  if not isinstance(metadata, dict) or not all(
    isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
  ):
    raise bad('its __metadata__ is not a map of strings to strings')
  for name, entry in header.items():
    if not isinstance(entry, dict):
      raise bad(f'tensor {name!r}: not a JSON object')
    dtype, shape, offsets = entry.get('dtype'), entry.get('shape'), entry.get('data_offsets')
    if dtype not in SAFETENSORS_DTYPE_BYTES:
      raise bad(f'tensor {name!r}: unknown dtype {dtype!r}')
    if not isinstance(shape, list) or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
      raise bad(f'tensor {name!r}: shape {shape!r} is not a list of sizes')
    if (
      not isinstance(offsets, list)
      or len(offsets) != 2
      or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
      or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
      raise bad(
        f'tensor {name!r}: byte range {offsets!r} is not within the '
        f'{data_bytes} data bytes of the file'
      )
    if math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
      raise bad(
        f'tensor {name!r}: {dtype} {shape} needs '
        f'{math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]} bytes, its byte range '
        f'holds {offsets[1] - offsets[0]}'
      )


def check_torch_zip(path: str) -> None:
  """Raises WeightFileError unless `path` is a zip-based torch.save file (what
  cal_jax.convert writes) whose entries all lie within the file."""
  if not zipfile.is_zipfile(path):
    raise WeightFileError(
      f'{path}: not a zip-based torch file, so not written by '
      'cal_jax.convert (damaged, or another format)'
    )
  size = os.path.getsize(path)
  try:
    with zipfile.ZipFile(path) as archive:
      entries = archive.infolist()
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
    raise WeightFileError(f'{path}: a damaged zip file ({error})') from None
  for entry in entries:
    if entry.compress_type != zipfile.ZIP_STORED:
      raise WeightFileError(
        f'{path}: entry {entry.filename!r} is compressed; torch.save '
        'writes stored entries: not a torch file, or repacked'
      )
    if entry.header_offset + entry.file_size > size:
      raise WeightFileError(
        f'{path}: entry {entry.filename!r} claims {entry.file_size} bytes '
        f'beyond the end of the {size}-byte file (a truncated copy?)'
      )
  if not any(e.filename == 'data.pkl' or e.filename.endswith('/data.pkl') for e in entries):
    raise WeightFileError(f'{path}: a zip file without data.pkl: not written by torch.save')


def _torch_load(path: str) -> Any:
  """torch.load(weights_only=True), memory-mapped: no code in the file runs and no
  size it claims is allocated. torch's own error text, which suggests an
  unrestricted load, is not repeated."""
  check_torch_zip(path)
  try:
    return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
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
    offender = next((line.strip() for line in str(error).splitlines() if 'GLOBAL' in line), None)
    if offender:
      raise WeightFileError(
        f'{path}: refused to load: the file holds objects other than '
        f'tensors, whose unpickling could run code '
        f'({offender.rstrip(".")}); export the model again with '
        'python -m cal_jax.convert'
      ) from error
    raise WeightFileError(
      f'{path}: not a readable torch file (damaged or truncated); export '
      'it again with python -m cal_jax.convert'
    ) from error


def read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
  """(state_dict, metadata) of an exported file; metadata holds at least 'config'.

  `.safetensors`: the metadata strings are JSON. `.pt`: a dict {'config',
  'state_dict', 'metadata'} read with `torch.load(weights_only=True)`. Nothing in
  the file is run, and its sizes are checked before anything is allocated.

  Raises:
    FileNotFoundError: `path` does not exist.
    WeightFileError (a ValueError): a damaged or unsafe file, or one not
      written by cal_jax.convert; the message names the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path!r} does not exist; write it with python -m cal_jax.convert')
  suffix = os.path.splitext(path)[1].lower()
  if suffix == '.safetensors':
    check_safetensors(path)
    from safetensors import safe_open

    try:
      with safe_open(path, framework='pt') as f:
        raw = f.metadata() or {}
        state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors' own error type
      raise WeightFileError(f'{path}: not a readable .safetensors file: {error}') from error
    metadata = {}
    for key, value in raw.items():
      try:
        metadata[key] = json.loads(value)
      except json.JSONDecodeError as error:
        raise WeightFileError(
          f'{path}: metadata field {key!r} is not JSON ({error}); was it '
          'written by cal_jax.convert?'
        ) from None
  elif suffix == '.pt':
    saved = _torch_load(path)
    if not isinstance(saved, dict) or 'state_dict' not in saved or 'config' not in saved:
      raise WeightFileError(
        f"{path}: not an exported CAL model (expected a dict with 'config' and 'state_dict')"
      )
    state = saved['state_dict']
    extra = saved.get('metadata', {})
    if not isinstance(extra, dict):
      raise WeightFileError(f"{path}: its 'metadata' is a {type(extra).__name__}, not a dict")
    metadata = {**extra, 'config': saved['config']}
  else:
    raise ValueError(f'{path}: unknown format {suffix!r}; expected .safetensors or .pt')
  if 'config' not in metadata:
    raise WeightFileError(
      f'{path}: no CAL hyper-parameters in its metadata; was it written by cal_jax.convert?'
    )
  if metadata.get('format', FORMAT) != FORMAT:
    raise WeightFileError(f'{path}: format {metadata["format"]!r}, this module reads {FORMAT!r}')
  if not isinstance(metadata['config'], dict):
    raise WeightFileError(
      f"{path}: its 'config' metadata is a "
      f'{type(metadata["config"]).__name__}, not a dict of hyper-parameters'
    )
  if not isinstance(state, dict) or not all(
    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
  ):
    raise WeightFileError(f'{path}: its state_dict is not a dict of named tensors')
  return state, metadata
