"""The safetensors header check exists twice on purpose: `cal_jax/models/weight_files.py`
(the JAX side, torchvision weights) and `cal_jax/interop/torch_files.py` (the PyTorch side,
which a PyTorch project copies alone). This holds the two copies to one behaviour: the same
tables, and on every file below (valid ones and each way a header can lie) the same verdict
and the same reason."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from cal_jax.interop import torch_files
from cal_jax.models import weight_files


def write(path, header, data=b'', length=None):
  raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(raw) if length is None else length) + raw + data)
  return path


def tensor(dtype='F32', shape=(2, 3), offsets=(0, 24)):
  return {'dtype': dtype, 'shape': list(shape), 'data_offsets': list(offsets)}


CASES = {
  'valid': lambda p: write(p, {'w': tensor()}, bytes(24)),
  'valid_with_metadata': lambda p: write(p, {'__metadata__': {'a': 'b'}, 'w': tensor()}, bytes(24)),
  'empty': lambda p: write(p, {}, b''),
  'short': lambda p: open(p, 'wb').write(b'\x01\x02') and p,
  'header_too_long': lambda p: write(p, {'w': tensor()}, bytes(24), length=10**9),
  'not_json': lambda p: write(p, b'{not json', b''),
  'not_utf8': lambda p: write(p, b'\xff\xfe\xfd', b''),
  'not_an_object': lambda p: write(p, [1, 2], b''),
  'metadata_not_strings': lambda p: write(p, {'__metadata__': {'a': 1}}, b''),
  'entry_not_object': lambda p: write(p, {'w': 5}, b''),
  'unknown_dtype': lambda p: write(p, {'w': tensor(dtype='F128')}, bytes(24)),
  'shape_not_list': lambda p: write(p, {'w': {**tensor(), 'shape': 6}}, bytes(24)),
  'negative_size': lambda p: write(p, {'w': tensor(shape=(-2, 3))}, bytes(24)),
  'bool_size': lambda p: write(p, {'w': tensor(shape=(True, 3))}, bytes(24)),
  'range_outside': lambda p: write(p, {'w': tensor(offsets=(0, 10**12))}, bytes(24)),
  'range_reversed': lambda p: write(p, {'w': tensor(offsets=(24, 0))}, bytes(24)),
  'range_three': lambda p: write(p, {'w': tensor(offsets=(0, 12, 24))}, bytes(24)),
  'size_mismatch': lambda p: write(p, {'w': tensor(shape=(1000, 1000))}, bytes(24)),
  'huge_claim': lambda p: write(p, {'w': tensor(shape=(2**40, 2**20))}, bytes(24)),
}


def verdict(check, path):
  try:
    check(str(path))
  except (weight_files.WeightFileError, torch_files.WeightFileError) as error:
    message = str(error)
    # The path before and the advice after differ on purpose (each names its own writer).
    return message[message.index('(') + 1 : message.rindex(')')]
  return 'valid'


def test_the_tables_are_the_same():
  assert weight_files.MAX_HEADER_BYTES == torch_files.MAX_HEADER_BYTES
  assert weight_files.DTYPE_BYTES == torch_files.SAFETENSORS_DTYPE_BYTES


@pytest.mark.parametrize('case', sorted(CASES))
def test_both_copies_give_the_same_verdict_and_reason(tmp_path, case):
  path = CASES[case](tmp_path / f'{case}.safetensors')
  jax_side = verdict(weight_files.check_safetensors, path)
  torch_side = verdict(torch_files.check_safetensors, path)
  assert jax_side == torch_side
  assert (jax_side == 'valid') == case.startswith(('valid', 'empty')), jax_side


def test_a_file_safetensors_writes_passes_both(tmp_path):
  path = str(tmp_path / 'real.safetensors')
  save_file({'a': np.ones((3, 4), np.float32), 'b': np.zeros((5,), np.int64)}, path)
  assert verdict(weight_files.check_safetensors, path) == 'valid'
  assert verdict(torch_files.check_safetensors, path) == 'valid'
