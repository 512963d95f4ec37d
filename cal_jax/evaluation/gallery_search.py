"""Searching your own images: folders of queries and gallery -> ranked matches.

What `python -m cal_jax.search` runs. A folder is read recursively. When every
image lies in a sub-folder, the first-level sub-folder names the identity,
and the search also reports R1, mAP and mINP. Each image is embedded once;
its feature is cached in a file keyed by the file's content, the modality and
the model, so a second search re-embeds only new images. Ranking goes by
query chunks against gallery chunks with a running top-k, so a gallery of a
million images needs neither its whole distance matrix nor more than
[chunk, gallery chunk] scores at a time.

Scores are `sum_p cos(f_p^q, f_p^g)` (Sec. 3.4), from -N_p to N_p; a query
whose best score is below ``threshold`` is answered "no match".
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cal_jax.data import images as images_lib
from cal_jax.data.datasets.folders import IMAGE_SUFFIXES
from cal_jax.data.modality import INFRARED, NAMES, VISIBLE
from cal_jax.data.splits import SplitArrays
from cal_jax.evaluation import metrics
from cal_jax.evaluation.embedding import extract_features

MODALITIES = {'visible': VISIBLE, 'infrared': INFRARED}
# An infrared camera gives R = G = B; a visible image whose channels differ by more than
# this (mean absolute difference, of 255) is a colour image.
COLOUR_GAP = 6.0


class SearchInputError(ValueError):
  """A folder or image the search cannot use; the message names it."""


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """The images of one folder: paths, encoded bytes, identities (or None), modality."""

  folder: str
  paths: list[str]
  encoded: list[bytes]
  identities: list[str] | None
  modality: int

  def split(self) -> SplitArrays:
    n = len(self.paths)
    names = sorted(set(self.identities)) if self.identities else []
    ids = [names.index(i) for i in self.identities] if self.identities else [-1] * n
    return SplitArrays(
      image=np.array(self.encoded + [b''], dtype=object)[:n],
      id=np.asarray(ids, np.int32),
      camera=np.full(n, -1, np.int32),
      modality=np.full(n, self.modality, np.int32),
      path=np.array(self.paths, dtype=object),
    )


def check_disjoint(query_folder: str, gallery_folder: str, query_paths=(), gallery_paths=()):
  """Raises SearchInputError when the query and gallery are one folder, or share images
  (a folder inside the other): each such query would find its own file first."""
  if os.path.realpath(query_folder) == os.path.realpath(gallery_folder):
    raise SearchInputError(
      f'--query and --gallery are the same folder {query_folder!r}: each query would find '
      'its own image first; give a gallery folder that does not hold the queries'
    )
  shared = sorted(
    set(map(os.path.realpath, query_paths)) & set(map(os.path.realpath, gallery_paths))
  )
  if shared:
    raise SearchInputError(
      f'{len(shared)} images are both in --query {query_folder!r} and in --gallery '
      f'{gallery_folder!r} (e.g. {shared[0]}): each would find itself first; give a gallery '
      'folder that does not hold the queries'
    )


def read_folder(folder: str, modality: str, role: str) -> ImageSet:
  """The images below `folder` (recursively), checked for the modality given.

  Raises:
    SearchInputError: no such folder, no image in it, an unreadable image (named),
      an infrared image in colour, or a visible folder whose images are all grey.
  """
  if modality not in MODALITIES:
    raise SearchInputError(f'--{role}_modality {modality!r}: choose visible or infrared')
  if not os.path.isdir(folder):
    raise SearchInputError(f'--{role} {folder!r} is not a folder')
  paths = sorted(
    os.path.join(root, name)
    for root, _, names in os.walk(folder)
    for name in names
    if name.lower().endswith(IMAGE_SUFFIXES)
  )
  if not paths:
    raise SearchInputError(
      f'--{role} {folder!r} holds no image ({", ".join(IMAGE_SUFFIXES)}, sub-folders included)'
    )
  encoded, grey = [], []
  for path in paths:
    try:
      data = images_lib.tfds_image(path)
    except images_lib.CorruptImageError as error:
      raise SearchInputError(f'{role} image {path!r} cannot be decoded: {error.args[0]}') from None
    encoded.append(data)
    grey.append(_channel_gap(data) <= COLOUR_GAP)
  if modality == 'infrared':
    colour = [p for p, g in zip(paths, grey) if not g]
    if colour:
      raise SearchInputError(
        f'{role} image {colour[0]!r} is in colour, but --{role}_modality is infrared '
        f"({len(colour)} of {len(paths)} images are): is it a visible camera's image? "
        f'Pass --{role}_modality visible, or leave it out'
      )
  elif all(grey):
    raise SearchInputError(
      f'every {role} image in {folder!r} is grey (R = G = B), as an infrared camera gives, but '
      f'--{role}_modality is visible: pass --{role}_modality infrared'
    )
  relative = [os.path.relpath(p, folder) for p in paths]
  nested = all(os.sep in r for r in relative)
  identities = [r.split(os.sep, 1)[0] for r in relative] if nested else None
  return ImageSet(folder, paths, encoded, identities, MODALITIES[modality])


def _channel_gap(encoded: bytes) -> float:
  """Mean |R - G| + |G - B| of an image, on a 64-pixel-high copy."""
  pixels = images_lib.resize_images([encoded], (64, 32), num_threads=1)[0].astype(np.float32)
  return float(
    np.mean(np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2]))
  )


class FeatureCache:
  """Features by (sha256 of the file's bytes, modality), for one model, in one .npz file."""

  def __init__(self, path: str | None, model_key: str):
    self.path, self.model_key = path, model_key
    self.features: dict[str, np.ndarray] = {}
    if path and os.path.exists(path):
      with np.load(path, allow_pickle=False) as saved:
        if str(saved['model_key']) == model_key:
          self.features = dict(zip(saved['keys'].tolist(), saved['features']))

  @staticmethod
  def key(encoded: bytes, modality: int) -> str:
    return f'{hashlib.sha256(encoded).hexdigest()}:{modality}'

  def save(self) -> None:
    if not self.path or not self.features:
      return
    keys = sorted(self.features)
    tmp = f'{self.path}.tmp{os.getpid()}.npz'
    np.savez(
      tmp,
      model_key=np.asarray(self.model_key),
      keys=np.asarray(keys),
      features=np.stack([self.features[k] for k in keys]),
    )
    os.replace(tmp, self.path)


def embed_set(
  embed_fn: Callable[[np.ndarray, int], np.ndarray],
  images: ImageSet,
  cache: FeatureCache,
  *,
  image_size: tuple[int, int],
  batch_size: int,
  flip: bool,
  num_parts: int,
) -> tuple[np.ndarray, int]:
  """[N, D] features of a folder's images, and how many were embedded (not cached)."""
  keys = [FeatureCache.key(e, images.modality) for e in images.encoded]
  todo = sorted({i for i, k in enumerate(keys) if k not in cache.features})
  if todo:
    features = extract_features(
      embed_fn,
      images.split(),
      np.asarray(todo),
      modality=images.modality,
      image_size=image_size,
      batch_size=batch_size,
      flip=flip,
      num_parts=num_parts,
    )
    for i, f in zip(todo, features):
      cache.features[keys[i]] = f
  return np.stack([cache.features[k] for k in keys]).astype(np.float32), len(todo)


def top_k(
  query: np.ndarray, gallery: np.ndarray, k: int, *, chunk: int = 1024, gallery_chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
  """The k best gallery rows per query by dot product: (indices [Q, k], scores [Q, k]),
  best first (ties: the lower index). Memory: [chunk, gallery_chunk + k] scores."""
  k = min(k, len(gallery))
  indices = np.empty((len(query), k), np.int64)
  scores = np.empty((len(query), k), np.float32)
  for start in range(0, len(query), chunk):
    q = query[start : start + chunk]
    best_i = np.empty((len(q), 0), np.int64)
    best_s = np.empty((len(q), 0), np.float32)
    for g_start in range(0, len(gallery), gallery_chunk):
      s = q @ gallery[g_start : g_start + gallery_chunk].T
      cand_s = np.concatenate([best_s, s], axis=1)
      cand_i = np.concatenate(
        [best_i, np.broadcast_to(np.arange(g_start, g_start + s.shape[1]), s.shape)], axis=1
      )
      keep = min(k, cand_s.shape[1])
      part = np.argpartition(-cand_s, keep - 1, axis=1)[:, :keep]
      best_s = np.take_along_axis(cand_s, part, axis=1)
      best_i = np.take_along_axis(cand_i, part, axis=1)
    order = _order(best_s, best_i)
    indices[start : start + len(q)] = np.take_along_axis(best_i, order, axis=1)
    scores[start : start + len(q)] = np.take_along_axis(best_s, order, axis=1)
  return indices, scores


def _order(scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """Per row: descending score, then ascending index."""
  by_index = np.argsort(indices, axis=1, kind='stable')
  by_score = np.argsort(-np.take_along_axis(scores, by_index, axis=1), axis=1, kind='stable')
  return np.take_along_axis(by_index, by_score, axis=1)


def labelled_metrics(
  query: np.ndarray,
  gallery: np.ndarray,
  query_ids: Sequence[str],
  gallery_ids: Sequence[str],
  *,
  chunk: int = 1024,
) -> dict[str, Any]:
  """R1, R5, R10, mAP, mINP (percent) of labelled folders, by query chunks; no camera
  rule (a folder has no cameras): every gallery image of the query's identity counts."""
  names = {n: i for i, n in enumerate(sorted(set(query_ids) | set(gallery_ids)))}
  q_ids = np.array([names[n] for n in query_ids])
  g_ids = np.array([names[n] for n in gallery_ids])
  cmc_sum, ap_sum, inp_sum, valid = None, 0.0, 0.0, 0
  for start in range(0, len(query), chunk):
    sl = slice(start, start + chunk)
    if not np.isin(q_ids[sl], g_ids).any():
      continue
    out = metrics.evaluate_ranking(
      -(query[sl] @ gallery.T), q_ids[sl], g_ids, protocol='regdb', max_rank=10
    )
    n = out['num_valid_queries']
    cmc = np.asarray(out['cmc']) * n
    cmc_sum = cmc if cmc_sum is None else cmc_sum + cmc
    ap_sum += out['mAP'] * n
    inp_sum += out['mINP'] * n
    valid += n
  if not valid:
    raise SearchInputError('no query identity has an image in the gallery: nothing to score')
  cmc = cmc_sum / valid
  at = lambda r: 100.0 * float(cmc[min(r, len(cmc)) - 1])
  return {
    'R1': at(1),
    'R5': at(5),
    'R10': at(10),
    'mAP': 100.0 * ap_sum / valid,
    'mINP': 100.0 * inp_sum / valid,
    'num_valid_queries': valid,
  }


def modality_name(modality: int) -> str:
  return NAMES[modality]
