"""Per-query loop references for the ranking metrics and gallery draws.

Straightforward re-writings of the standard code family's loops, kept apart
so that the tests and the benchmark share one copy:

* `loop_eval` follows ``eval_sysu`` and ``eval_regdb`` of AGW
  (mangye16/Cross-Modal-Re-ID-baseline, ``eval_metrics.py``) and
  ``eval_llcm`` of DEEN (ZYK100/LLCM) step by step: one query at a time, the
  removal mask, the unique-identity list built with
  ``np.unique(..., return_index=True)`` and sorted indices, the float32 CMC.
  The one deliberate change: ``np.argsort(..., kind="stable")`` instead of the
  default (unstable) quicksort, the tie rule `cal_jax.evaluation.metrics` uses.
* `agw_sysu_gallery` / `agw_sysu_query` and `deen_llcm_gallery` /
  `deen_llcm_query` list a data set folder the way AGW's and DEEN's
  ``data_manager.py`` do, with ``random.seed(trial)``; `agw_sysu_gallery`
  takes ``shots=10`` for this project's multi-shot rule.
* `mpanet_gallery_names` follows MPANet's ``get_gallery_names``.
"""

from __future__ import annotations

import os
import random

import numpy as np


def loop_eval(distmat, q_pids, g_pids, q_camids=None, g_camids=None, protocol='sysu', max_rank=20):
  """Returns (cmc float32 [max_rank], mAP, mINP) like the reference loops."""
  num_q, num_g = distmat.shape
  max_rank = min(max_rank, num_g)
  indices = np.argsort(distmat, axis=1, kind='stable')
  ranked_pids = g_pids[indices]
  matches = (ranked_pids == q_pids[:, None]).astype(np.int32)

  unique_curves, plain_curves, aps, inps = [], [], [], []
  num_valid = 0.0
  for q in range(num_q):
    order = indices[q]
    if protocol == 'sysu':
      removed = (q_camids[q] == 3) & (g_camids[order] == 2)
    elif protocol == 'llcm':
      removed = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
    else:  # regdb: every query camera 1, every gallery camera 2
      removed = np.zeros(num_g, dtype=bool)
    keep = ~removed

    if protocol in ('sysu', 'llcm'):
      kept_pids = ranked_pids[q][keep]
      first_index = np.unique(kept_pids, return_index=True)[1]
      unique_list = np.array([kept_pids[i] for i in sorted(first_index)])
      unique_curve = (unique_list == q_pids[q]).astype(np.int32).cumsum()
      unique_curves.append(unique_curve[:max_rank])

    hits = matches[q][keep]
    if not np.any(hits):
      continue
    cum = hits.cumsum()
    last = np.max(np.where(hits == 1))
    inps.append(cum[last] / (last + 1.0))
    cum[cum > 1] = 1
    plain_curves.append(cum[:max_rank])
    num_valid += 1.0
    precision = np.asarray([x / (i + 1.0) for i, x in enumerate(hits.cumsum())])
    aps.append((precision * hits).sum() / hits.sum())

  if num_valid == 0:
    raise AssertionError('all query identities are absent from the gallery')
  curves = unique_curves if protocol in ('sysu', 'llcm') else plain_curves
  cmc = np.asarray(curves).astype(np.float32).sum(0) / num_valid
  return cmc, np.mean(aps), np.mean(inps)


def _sorted_files(folder):
  return sorted(folder + '/' + name for name in os.listdir(folder))


def _read_ids(id_file):
  with open(id_file) as f:
    first_line = f.read().splitlines()[0]
  return ['%04d' % int(x) for x in first_line.split(',')]


def agw_sysu_query(root):
  """Infrared query paths, listed like AGW's ``process_query_sysu``."""
  paths = []
  for pid in sorted(_read_ids(os.path.join(root, 'exp/test_id.txt'))):
    for cam in ('cam3', 'cam6'):
      folder = os.path.join(root, cam, pid)
      if os.path.isdir(folder):
        paths.extend(_sorted_files(folder))
  return paths


def agw_sysu_gallery(root, mode='all', trial=0, shots=1):
  """Gallery paths drawn like AGW's ``process_gallery_sysu``, seeded.

  ``shots=1`` is AGW's ``random.choice``; ``shots=10`` this project's
  multi-shot rule (``random.sample`` of at most ten).
  """
  random.seed(trial)
  cams = ('cam1', 'cam2', 'cam4', 'cam5') if mode == 'all' else ('cam1', 'cam2')
  paths = []
  for pid in sorted(_read_ids(os.path.join(root, 'exp/test_id.txt'))):
    for cam in cams:
      folder = os.path.join(root, cam, pid)
      if os.path.isdir(folder):
        files = _sorted_files(folder)
        if shots == 1:
          paths.append(random.choice(files))
        else:
          paths.extend(random.sample(files, min(shots, len(files))))
  return paths


_LLCM_CAMS = {
  1: ['test_vis/cam%d' % c for c in range(1, 10)],
  2: ['test_nir/cam%d' % c for c in (1, 2, 4, 5, 6, 7, 8, 9)],
}


def deen_llcm_query(root, mode):
  """Paths listed like DEEN's ``process_query_llcm`` (mode 1 vis, 2 nir)."""
  paths = []
  for pid in sorted(_read_ids(os.path.join(root, 'idx/test_id.txt'))):
    for cam in _LLCM_CAMS[mode]:
      folder = os.path.join(root, cam, pid)
      if os.path.isdir(folder):
        paths.extend(_sorted_files(folder))
  return paths


def deen_llcm_gallery(root, mode, trial):
  """Paths drawn like DEEN's ``process_gallery_llcm``."""
  random.seed(trial)
  paths = []
  for pid in sorted(_read_ids(os.path.join(root, 'idx/test_id.txt'))):
    for cam in _LLCM_CAMS[mode]:
      folder = os.path.join(root, cam, pid)
      if os.path.isdir(folder):
        paths.append(random.choice(_sorted_files(folder)))
  return paths


def mpanet_gallery_names(perm, cams, ids, trial, num_shots):
  """``cam/pid/number`` names that MPANet's ``get_gallery_names`` keeps."""
  names = []
  for cam in cams:
    cam_perm = perm[cam - 1][0].squeeze()
    for pid in ids:
      picks = cam_perm[pid - 1][trial][:num_shots]
      names.extend('cam%d/%04d/%04d' % (cam, pid, n) for n in picks.tolist())
  return names
