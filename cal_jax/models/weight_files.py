"""Checks of weight files before a library reads them (Python's standard library only).

  check_safetensors(path)   the header of a `.safetensors` file: its length, its
                            JSON, every tensor's dtype, shape and byte range
                            within the file, and the metadata strings
  check_torch_zip(path)     True for a zip-based `torch.save` file whose entries
                            all lie within the file (stored, not compressed);
                            False for another file (a legacy `torch.save`
                            pickle, or not a torch file at all)

Both read only the file's own index (header, zip directory) and raise
`WeightFileError` (a ValueError) naming the file, so that no size the file
claims is allocated before it is known to fit in the file. `cal_jax/interop/torch_files.py`
keeps its own copy of these checks, so that it can be copied alone into a
PyTorch project (tests/test_bad_inputs.py runs both on the same files).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile

# safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100 * 2**20
DTYPE_BYTES = {
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
  """A weight file that is damaged, not of its format, or inconsistent."""


def check_safetensors(path: str) -> None:
  """Raises WeightFileError unless `path` has a consistent safetensors header."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  bad = lambda why: WeightFileError(
    f'{path}: not a valid .safetensors file ({why}); write it again with safetensors.save_file'
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
    if dtype not in DTYPE_BYTES:
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
    count = 1
    for d in shape:
      count *= d
    if count * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
      raise bad(
        f'tensor {name!r}: {dtype} {shape} needs {count * DTYPE_BYTES[dtype]} bytes, '
        f'its byte range holds {offsets[1] - offsets[0]}'
      )


def check_torch_zip(path: str) -> bool:
  """True for a consistent zip-based torch file, False when `path` is not a zip.

  Raises:
    WeightFileError: a zip whose directory claims entries beyond the file's
      end, compressed entries (torch.save stores them), or no data.pkl.
  """
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    return False
  size = os.path.getsize(path)
  try:
    with zipfile.ZipFile(path) as archive:
      entries = archive.infolist()
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
    raise WeightFileError(
      f'{path}: a damaged zip file ({error}); save it again with torch.save'
    ) from None
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
  return True
