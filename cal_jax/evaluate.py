"""The evaluator: a model's embedding function -> results of the test protocols.

`evaluate` builds the query and gallery sets of every protocol key and trial
(`cal_jax.protocols.build_split`), embeds each test image it needs once
(`extract_features`, on the fixed-shape batches of
`cal_jax.input_pipeline.create_eval_dataset`), ranks with the negative dot
product of the features and scores with `cal_jax.metrics.evaluate_ranking`.

Features are split into ``num_parts`` equal chunks, each of unit L2 norm, so
the dot product of two features is the paper's similarity
sum_p cos(f_p^{V,V}, f_p^{I,I}) (Sec. 3.4); `CAL.embed` already returns them
so, and the evaluator re-normalises after averaging an image's two views.

The image set of a modality is the union over every key and trial (for
SYSU-MM01: every infrared query, and every visible image that any of the ten
single- or multi-shot draws picks), embedded once. Likewise the distances:
one matrix product per (probe modality, gallery modality) pair, all probes
against the union of the galleries; each trial takes its rows and columns
(SYSU-MM01: one 3,803 x ~7,000 float32 matrix, about 100 MB, instead of 40
products).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cal_jax import input_pipeline
from cal_jax import metrics
from cal_jax import protocols
from cal_jax import results as results_lib

# Images [B, H, W, 3] (or [L, B / L, H, W, 3] with local devices), modality
# -> features [B, D] (or [L, B / L, D]).
EmbedFn = Callable[[np.ndarray, int], Any]
# (extract: indices [N] -> features [N, D], indices) -> features [N, D].
Distribute = Callable[[Callable[[np.ndarray], np.ndarray], np.ndarray],
                      np.ndarray]

DATASET_PREFIX = {"sysu_mm01": "sysu", "regdb": "regdb", "llcm": "llcm"}
CMC_RANKS = (1, 5, 10, 20)
MODALITY_NAMES = {protocols.VISIBLE: "visible", protocols.INFRARED: "infrared"}
_EPSILON = 1e-12  # as `cal_jax.models.cal.l2_normalize`


def protocol_keys(dataset_name: str) -> list[str]:
  """The protocol keys of a data set (its tfds builder name).

  Returns:
    sysu_mm01: all/indoor x single/multi; regdb: v2t, t2v; llcm: v2n, n2v.
  """
  if dataset_name not in DATASET_PREFIX:
    raise ValueError(f"no test protocols for data set {dataset_name!r}; "
                     f"one of {sorted(DATASET_PREFIX)}")
  prefix = DATASET_PREFIX[dataset_name] + "/"
  return [k for k in protocols.PROTOCOL_KEYS if k.startswith(prefix)]


def normalize_parts(features: np.ndarray, num_parts: int) -> np.ndarray:
  """Gives each of the num_parts chunks of a feature unit L2 norm.

  Args:
    features: [N, D], D = num_parts * C.
    num_parts: N_p.

  Returns:
    float32 [N, D]; an all-zero chunk stays zero.
  """
  n, dim = features.shape
  if dim % num_parts:
    raise ValueError(f"feature width {dim} is not a multiple of "
                     f"num_parts={num_parts} (config.model.num_parts)")
  parts = np.asarray(features, np.float32).reshape(n, num_parts, -1)
  squared = np.maximum(np.sum(np.square(parts), axis=-1, keepdims=True),
                       _EPSILON)
  return (parts / np.sqrt(squared)).reshape(n, dim)


def extract_features(
    embed_fn: EmbedFn,
    split: input_pipeline.SplitArrays,
    indices: Sequence[int] | np.ndarray,
    *,
    modality: int,
    image_size: tuple[int, int],
    batch_size: int,
    flip: bool,
    num_parts: int,
    local_devices: int | None = None,
) -> np.ndarray:
  """Embeds the given images of one modality.

  Args:
    embed_fn: ``embed_fn(images, modality)``; images are float32 ImageNet-
      normalised [B, H, W, 3] (B = batch_size; the last batch is padded by
      repeating the first image), or [L, B / L, H, W, 3] when
      ``local_devices`` = L is given (a pmapped function); returns [B, D]
      (or [L, B / L, D]) features, D = num_parts * C.
    split: the test split.
    indices: [N] example indices into ``split``, all of ``modality``.
    modality: 0 visible, 1 infrared; passed on to ``embed_fn``.
    image_size: (height, width) of the network input.
    batch_size: images per call (config.data.eval_batch_size).
    flip: average the features of each image and of its mirror image
      (config.data.eval_flip).
    num_parts: N_p; each of the N_p chunks of a feature is re-normalised.
    local_devices: see ``embed_fn``.

  Returns:
    float32 [N, D], row i the feature of ``split`` example ``indices[i]``,
    each part of unit L2 norm.
  """
  indices = np.asarray(indices, np.int64).ravel()
  if indices.size:
    found = np.unique(split.modality[indices])
    if found.tolist() != [modality]:
      names = [MODALITY_NAMES.get(int(m), str(m)) for m in found]
      raise ValueError(
          f"extract_features embeds images of one modality per call: asked "
          f"for {MODALITY_NAMES.get(modality, modality)} ({modality}), the "
          f"indices hold {names}")
  dataset = input_pipeline.create_eval_dataset(
      split, indices, image_size=image_size, batch_size=batch_size, flip=flip,
      local_devices=local_devices)
  chunks, order = [], []
  for batch in dataset.as_numpy_iterator():
    out = _embed(embed_fn, batch["image"], modality, batch_size)
    if flip:
      out = 0.5 * (out + _embed(embed_fn, batch["image_flipped"], modality,
                                batch_size))
    mask = batch["mask"].reshape(-1)
    chunks.append(out[mask])
    order.append(batch["index"].reshape(-1)[mask])
  if not np.array_equal(np.concatenate(order), indices):
    raise RuntimeError("the evaluation batches did not return the images in "
                       "the order asked")
  return normalize_parts(np.concatenate(chunks), num_parts)


def _embed(embed_fn: EmbedFn, images: np.ndarray, modality: int,
           batch_size: int) -> np.ndarray:
  """One call of embed_fn, its output as float32 [batch_size, D]."""
  out = np.asarray(embed_fn(images, modality), np.float32)
  if out.ndim != images.ndim - 2 or out.shape[:-1] != images.shape[:-3]:
    raise ValueError(f"embed_fn returned shape {out.shape} for images of "
                     f"shape {images.shape}; expected {images.shape[:-3]} "
                     "+ (D,)")
  return out.reshape(batch_size, -1)


def evaluate(
    embed_fn: EmbedFn,
    test_split: input_pipeline.SplitArrays,
    dataset_name: str,
    *,
    config: Any,
    keys: Sequence[str] | None = None,
    num_trials: int = protocols.NUM_TRIALS,
    rand_perm_path: str | None = None,
    llcm_v2n_as_released: bool = False,
    local_devices: int | None = None,
    distribute: Distribute | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, dict[str, Any]]:
  """Scores a model on the test protocols of a data set.

  SYSU-MM01 and LLCM: the result of a key is the mean (and standard deviation)
  over ``num_trials`` gallery draws, trials 0..num_trials-1. RegDB: the test
  split given is that of one data split (builder config ``trial_t``) and its
  result is that one evaluation, ``trials`` = 1. The standard RegDB figure is
  the mean over the ten splits, each with its own trained model: train and
  evaluate ten times (trial_1 .. trial_10) and merge the ten results with
  `cal_jax.results.combine_runs`.

  Args:
    embed_fn: see `extract_features`; must not depend on anything but its
      inputs (each image is embedded once and its feature reused).
    test_split: the test split (`input_pipeline.load_tfds_split`).
    dataset_name: builder name: "sysu_mm01", "regdb" or "llcm".
    config: reads config.data.{eval_batch_size, eval_flip, image_height,
      image_width, builder_config} and config.model.num_parts.
    keys: protocol keys to run; default all of the data set's
      (`protocol_keys`).
    num_trials: gallery draws (SYSU-MM01, LLCM); ignored for RegDB.
    rand_perm_path: SYSU-MM01 only: the data set's ``exp/rand_perm_cam.mat``;
      the galleries then follow it instead of ``random.seed(trial)``.
    llcm_v2n_as_released: see `protocols.build_split`.
    local_devices: see `extract_features`.
    distribute: ``distribute(extract, indices)`` returns ``extract(indices)``,
      the features [N, D] of ``indices`` in order, however it shares the work;
      None calls ``extract`` directly. Multi-host runs pass
      `cal_jax.distributed.split_and_gather`.
    log: called with one line of progress per step.

  Returns:
    {key: result}, result as `cal_jax.results.summarize` gives it: R1, R5,
    R10, R20, mAP, mINP in percent (mean over trials), each with ``*_std``,
    ``trials``, ``gallery_draw`` and ``per_trial``.
  """
  keys = list(keys) if keys is not None else protocol_keys(dataset_name)
  allowed = protocol_keys(dataset_name)
  for key in keys:
    if key not in allowed:
      raise ValueError(f"protocol key {key!r} does not belong to data set "
                       f"{dataset_name!r}; its keys are {allowed}")
  if not keys:
    raise ValueError("no protocol keys to evaluate")
  if num_trials < 1:
    raise ValueError(f"num_trials must be positive, got {num_trials}")
  rand_perm = None
  if rand_perm_path:
    if dataset_name != "sysu_mm01":
      raise ValueError("rand_perm_path only applies to SYSU-MM01")
    rand_perm = protocols.load_rand_perm(rand_perm_path)

  table = protocols.RecordTable(
      paths=np.asarray(test_split.path, dtype=object),
      ids=np.asarray(test_split.id, np.int64),
      cameras=np.asarray(test_split.camera, np.int64),
      modalities=np.asarray(test_split.modality, np.int64))
  trials = [0] if dataset_name == "regdb" else list(range(num_trials))
  splits = {key: [protocols.build_split(
      table, key, t, rand_perm=rand_perm,
      llcm_v2n_as_released=llcm_v2n_as_released) for t in trials]
            for key in keys}
  if dataset_name == "regdb":
    splits = _label_regdb(splits, config.data.get("builder_config", ""))

  groups = _by_modalities(splits, table)
  features, row_of = _embed_all(embed_fn, test_split, splits, config,
                                local_devices, distribute, log)
  out = {}
  for group in groups.values():
    start = time.perf_counter()
    distances = _Distances(features, row_of,
                           [s for key in group for s in splits[key]])
    log(f"distances of {len(distances.rows)} probes to "
        f"{len(distances.cols)} gallery images in "
        f"{time.perf_counter() - start:.1f} s")
    for key in group:
      start = time.perf_counter()
      per_trial = [_score(distances, table, s) for s in splits[key]]
      out[key] = results_lib.summarize(per_trial,
                                       [s.gallery_draw for s in splits[key]])
      r = out[key]
      log(f"{key}: R1 {r['R1']:.2f} R10 {r['R10']:.2f} mAP {r['mAP']:.2f} "
          f"mINP {r['mINP']:.2f} over {r['trials']} trial(s) "
          f"({time.perf_counter() - start:.1f} s)")
    del distances
  return {key: out[key] for key in keys}


def _label_regdb(splits: dict[str, list[protocols.Split]],
                 builder_config: str) -> dict[str, list[protocols.Split]]:
  """Names the RegDB data split ('trial_t') in trial and gallery_draw."""
  if not builder_config:
    return splits
  number = builder_config.rsplit("_", 1)[-1]
  return {key: [dataclasses.replace(
      s, trial=int(number) if number.isdigit() else s.trial,
      gallery_draw=f"{s.gallery_draw} of {builder_config}")
                for s in key_splits]
          for key, key_splits in splits.items()}


def _embed_all(
    embed_fn: EmbedFn,
    split: input_pipeline.SplitArrays,
    splits: dict[str, list[protocols.Split]],
    config: Any,
    local_devices: int | None,
    distribute: Distribute | None,
    log: Callable[[str], Any],
) -> tuple[np.ndarray, np.ndarray]:
  """Embeds, once each, the images any split uses, one modality at a time.

  Returns:
    features [M, D] of the M distinct images used, and [N] rows into it per
    example of ``split`` (-1 for an example no split uses).
  """
  used = np.unique(np.concatenate(
      [np.concatenate([s.query, s.gallery])
       for key_splits in splits.values() for s in key_splits]))
  modalities = np.asarray(split.modality)[used]
  row_of = np.full(len(split), -1, np.int64)
  blocks = []
  num_rows = 0
  for modality in np.unique(modalities):
    indices = used[modalities == modality]
    start = time.perf_counter()
    extract = functools.partial(
        extract_features, embed_fn, split, modality=int(modality),
        image_size=(int(config.data.image_height),
                    int(config.data.image_width)),
        batch_size=int(config.data.eval_batch_size),
        flip=bool(config.data.eval_flip),
        num_parts=int(config.model.num_parts),
        local_devices=local_devices)
    blocks.append(distribute(extract, indices) if distribute
                  else extract(indices))
    row_of[indices] = num_rows + np.arange(len(indices))
    num_rows += len(indices)
    log(f"embedded {len(indices)} {MODALITY_NAMES.get(int(modality))} images "
        f"in {time.perf_counter() - start:.1f} s")
  return np.concatenate(blocks), row_of


def _by_modalities(splits: dict[str, list[protocols.Split]],
                   table: protocols.RecordTable
                   ) -> dict[tuple[int, int], list[str]]:
  """Keys grouped by (probe modality, gallery modality), in key order."""
  groups: dict[tuple[int, int], list[str]] = {}
  for key, key_splits in splits.items():
    pairs = set()
    for s in key_splits:
      for name, part in (("query", s.query), ("gallery", s.gallery)):
        if not len(part):
          raise ValueError(f"the {name} of {key} (trial {s.trial}) is empty: "
                           "does the test split hold both modalities?")
        if len(np.unique(table.modalities[part])) != 1:
          raise ValueError(f"the {name} of {key} (trial {s.trial}) mixes "
                           "modalities")
      pairs.add((int(table.modalities[s.query[0]]),
                 int(table.modalities[s.gallery[0]])))
    if len(pairs) != 1:
      raise ValueError(f"the trials of {key} use different modalities")
    groups.setdefault(pairs.pop(), []).append(key)
  return groups


class _Distances:
  """-<f_q, f_g> between every probe and gallery image of some splits.

  One matrix product for all the trials of a group of keys: their probes
  against the union of their galleries (SYSU-MM01: every infrared probe
  against every visible image any draw picks), [R, C] float32; a trial takes
  its rows and columns.
  """

  def __init__(self, features: np.ndarray, row_of: np.ndarray,
               splits: Sequence[protocols.Split]):
    self.rows = np.unique(np.concatenate([s.query for s in splits]))
    self.cols = np.unique(np.concatenate([s.gallery for s in splits]))
    self.matrix = -(features[row_of[self.rows]] @ features[row_of[self.cols]].T)

  def of(self, split: protocols.Split) -> np.ndarray:
    """[Q, G] distances of one trial's probes and gallery, in their order."""
    return self.matrix[np.ix_(np.searchsorted(self.rows, split.query),
                              np.searchsorted(self.cols, split.gallery))]


def _score(distances: _Distances, table: protocols.RecordTable,
           split: protocols.Split) -> dict[str, Any]:
  """Metrics of one trial, in percent (see `cal_jax.results.summarize`)."""
  scores = metrics.evaluate_ranking(
      distances.of(split),
      table.ids[split.query], table.ids[split.gallery],
      table.cameras[split.query], table.cameras[split.gallery],
      protocol=split.metric, max_rank=max(CMC_RANKS))
  cmc = scores["cmc"]
  out: dict[str, float] = {"trial": split.trial}
  out.update({f"R{k}": 100.0 * float(cmc[min(k, len(cmc)) - 1])
              for k in CMC_RANKS})
  out["mAP"] = 100.0 * scores["mAP"]
  out["mINP"] = 100.0 * scores["mINP"]
  out["num_valid_queries"] = scores["num_valid_queries"]
  out["num_gallery"] = int(len(split.gallery))
  out["cmc"] = [100.0 * float(v) for v in cmc]
  return out
