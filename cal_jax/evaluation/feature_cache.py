"""The test features of one checkpoint, kept in the workdir so re-evaluating re-embeds nothing.

  WORKDIR/eval_features.npz    features [M, D] float32, the test-split indices [M]
                               they belong to, and the key they were made under

The key is a hash of everything an embedding depends on: the checkpoint step and a
digest of its parameters and batch statistics (a run restarted in the same workdir
has other weights at the same step), the network's fields (`dtype` included), M-hat,
the embedding kind, the image size, `flip`, N_p, and the test split (its size and a
digest of its identities, cameras and modalities). Protocols, trial counts, gallery
conventions and re-ranking are not in it: another `eval.num_trials`, another
protocol key or `eval.rand_perm_path` reuses the features. A different key replaces
the file (one file per workdir: a SYSU-MM01 test set at ResNet-50 width is about
300 MB, so one per evaluated step would fill the disk of a long run).

Images are cached one by one: an evaluation that needs images the file lacks embeds
only those and adds them. The file is written once per evaluation, atomically; when
it cannot be written (a full disk) the evaluation goes on without it, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from cal_jax.runtime import workdir as workdir_lib

FILENAME = 'eval_features.npz'


def _digest(*arrays: Any) -> str:
  h = hashlib.blake2b(digest_size=16)
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def cache_key(
  model: Any, variables: Any, m_hat: np.ndarray, kind: str, settings: Any, step: int, split: Any
) -> str:
  """The hash the features of `model` with `variables` on `split` are stored under."""
  fields = {
    f.name: repr(getattr(model, f.name))
    for f in dataclasses.fields(model)
    if f.name not in ('parent', 'name')
  }
  described = {
    'step': int(step),
    'weights': _digest(*jax.tree_util.tree_leaves(variables)),
    'model': fields,
    'm_hat': np.asarray(m_hat).tolist(),
    'kind': kind,
    'image_size': list(settings.image_size),
    'flip': bool(settings.flip),
    'num_parts': int(settings.num_parts),
    'split': [len(split), _digest(split.id, split.camera, split.modality)],
  }
  return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


class FeatureCache:
  """The features of one key, read from and written to WORKDIR/eval_features.npz."""

  def __init__(self, workdir: str, key: str):
    self.path = os.path.join(workdir, FILENAME)
    self.key = key
    self.indices = np.zeros([0], np.int64)
    self.features: np.ndarray | None = None
    self.hits = 0
    self.changed = False
    if os.path.isfile(self.path):
      try:
        with np.load(self.path) as saved:
          if str(saved['key']) == key:
            self.indices, self.features = saved['indices'], saved['features']
      except (OSError, ValueError, KeyError) as error:  # damaged: embed again, replace it
        logging.warning(
          'Ignoring the feature cache %s (%s); it will be replaced.', self.path, error
        )

  def lookup(self, indices: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(features of the cached ones among `indices`, in order, or None; a mask of the missing)."""
    indices = np.asarray(indices, np.int64)
    if self.features is None or not len(self.indices):
      return None, np.ones(len(indices), bool)
    order = np.argsort(self.indices)
    position = np.searchsorted(self.indices, indices, sorter=order).clip(0, len(order) - 1)
    rows = order[position]
    found = self.indices[rows] == indices
    self.hits += int(found.sum())
    out = np.zeros((len(indices), self.features.shape[1]), np.float32)
    out[found] = self.features[rows[found]]
    return out, ~found

  def store(self, indices: np.ndarray, features: np.ndarray) -> None:
    """Adds the features of `indices`, in memory; `write` saves them."""
    indices = np.asarray(indices, np.int64)
    if self.features is not None and len(self.indices):
      if self.features.shape[1] != features.shape[1]:
        self.indices, self.features = np.zeros([0], np.int64), None
    if self.features is None or not len(self.indices):
      self.indices, self.features = indices, np.asarray(features, np.float32)
    else:
      self.indices = np.concatenate([self.indices, indices])
      self.features = np.concatenate([self.features, np.asarray(features, np.float32)])
    self.changed = True

  def write(self) -> None:
    """Rewrites the file (atomically) if anything was stored since it was read."""
    if not self.changed:
      return
    self.changed = False
    try:
      workdir_lib.write_atomically(
        self.path,
        lambda f: np.savez(
          f, key=np.asarray(self.key), indices=self.indices, features=self.features
        ),
      )
    except OSError as error:
      logging.warning(
        'Could not write the feature cache %s (%s); going on without it.', self.path, error
      )
