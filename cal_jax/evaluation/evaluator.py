"""The evaluator: a model's embedding function -> results of the test protocols.

`evaluate` builds the query and gallery sets of every protocol key and trial
(`protocols.build_split`), embeds each test image it needs once
(`extract_features`, on the fixed-shape batches of
`cal_jax.data.eval_batches.create_eval_dataset`), ranks with the negative dot
product of the features and scores with `metrics.evaluate_ranking`. It returns
an `Evaluation`: the results, and the features and splits they come from, which
the pictures read. What it needs of the run's config is an `EvalSettings`,
built once (`EvalSettings.from_config`).

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
products). Where that matrix would exceed ``union_matrix_bytes`` (a 100k-image
gallery), each trial's distances are computed one chunk of probes at a time
instead (`metrics.NegativeProducts`): memory is then bounded by the metrics'
chunk budget, whatever the gallery's size. The `Evaluation` reports the time
spent embedding, in distances and in the metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cal_jax.data.datasets import specs
from cal_jax.data.modality import NAMES as MODALITY_NAMES
from cal_jax.data.splits import SplitArrays
from cal_jax.evaluation import protocols
from cal_jax.evaluation import rerank as rerank_lib
from cal_jax.evaluation import results as results_lib
from cal_jax.evaluation.distances import UNION_MATRIX_BYTES, Distances, by_modalities, score
from cal_jax.evaluation.embedding import EmbedFn, extract_features
from cal_jax.evaluation.progress import Progress
from cal_jax.runtime.terminal import format_rate

# (extract: indices [N] -> features [N, D], indices) -> features [N, D].
Distribute = Callable[[Callable[[np.ndarray], np.ndarray], np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What the evaluator needs of a run's config, read once (`from_config`).

  Attributes:
    image_size: (height, width) of the network input.
    batch_size: images per call of the embedding (config.data.eval_batch_size).
    flip: average each image's features with its mirror image's
      (config.data.eval_flip).
    num_parts: the chunks of a feature that are each L2-normalised: N_p for
      CAL's part embedding, 1 for the baseline's global one.
    num_trials: gallery draws (SYSU-MM01, LLCM; config.eval.num_trials).
    rand_perm_path: SYSU-MM01's ``exp/rand_perm_cam.mat``, or '' for seeded draws.
    builder_config: RegDB's data split ('trial_t'), named in its results.
    embedding: 'parts' (CAL) or 'global' (the baseline), config.model.embedding.
    rerank: k-reciprocal re-ranking of each trial's distances, or None (config.eval.rerank).
    cache_features: keep the test features in the workdir (config.eval.cache_features).
    progress_seconds: at most one progress line per this many seconds while images are
      embedded and protocols scored, and a last one if the work took longer
      (config.eval.progress_seconds).
  """

  image_size: tuple[int, int]
  batch_size: int
  flip: bool
  num_parts: int
  num_trials: int = protocols.NUM_TRIALS
  rand_perm_path: str = ''
  builder_config: str = ''
  embedding: str = 'parts'
  rerank: rerank_lib.RerankSettings | None = None
  cache_features: bool = False
  progress_seconds: float = 30.0

  @classmethod
  def from_config(cls, config: Any) -> EvalSettings:
    embedding = config.model.embedding
    return cls(
      image_size=(int(config.data.image_height), int(config.data.image_width)),
      batch_size=int(config.data.eval_batch_size),
      flip=bool(config.data.eval_flip),
      # The baseline's global feature is normalised whole: one "part".
      num_parts=1 if embedding == 'global' else int(config.model.num_parts),
      num_trials=int(config.eval.num_trials),
      rand_perm_path=config.eval.rand_perm_path or '',
      builder_config=config.data.builder_config or '',
      embedding=embedding,
      rerank=(
        rerank_lib.RerankSettings(
          int(config.eval.rerank_k1), int(config.eval.rerank_k2), float(config.eval.rerank_lambda)
        )
        if config.eval.rerank
        else None
      ),
      cache_features=bool(config.eval.cache_features),
      progress_seconds=float(config.eval.progress_seconds),
    )


class NonFiniteFeaturesError(FloatingPointError):
  """Test embeddings that are NaN or infinite: the evaluated model has diverged."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The results of the test protocols, and what they were computed from.

  Attributes:
    results: {protocol key: result} (`cal_jax.evaluation.results.summarize`).
    features: float32 [M, D], the features of the M test images any split uses.
    row_of: int64 [N], the row in `features` of each test example (-1: unused).
    splits: {protocol key: [Split] per trial}, the queries and galleries scored.
    timing: seconds spent 'embedding', in 'distances' and in 'metrics', the
      'images' embedded, the 'cached_images' read from the feature cache, and
      'images_per_second' of the embedding.
  """

  results: dict[str, dict[str, Any]]
  features: np.ndarray
  row_of: np.ndarray
  splits: dict[str, list[protocols.Split]]
  timing: dict[str, float] = dataclasses.field(default_factory=dict)

  def features_of(self, indices: np.ndarray) -> np.ndarray:
    """[len(indices), D] features of test examples that a split uses."""
    rows = self.row_of[np.asarray(indices)]
    if (rows < 0).any():
      raise ValueError('features asked for test images that no evaluated split uses')
    return self.features[rows]


def protocol_keys(dataset_name: str) -> list[str]:
  """The protocol keys of a data set (its tfds builder name).

  Returns:
    sysu_mm01: all/indoor x single/multi; regdb: v2t, t2v; llcm: v2n, n2v.
  """
  return list(specs.spec_of(dataset_name).protocols)


def evaluate(
  embed_fn: EmbedFn,
  test_split: SplitArrays,
  dataset_name: str,
  settings: EvalSettings,
  *,
  keys: Sequence[str] | None = None,
  llcm_v2n_as_released: bool = False,
  local_devices: int | None = None,
  distribute: Distribute | None = None,
  log: Callable[[str], Any] = print,
  union_matrix_bytes: int = UNION_MATRIX_BYTES,
  cache: Any | None = None,
  say: Callable[[str], Any] | None = None,
) -> Evaluation:
  """Scores a model on the test protocols of a data set.

  SYSU-MM01 and LLCM: the result of a key is the mean (and standard deviation)
  over ``settings.num_trials`` gallery draws, trials 0..num_trials-1. RegDB: the test
  split given is that of one data split (builder config ``trial_t``) and its
  result is that one evaluation, ``trials`` = 1. The standard RegDB figure is
  the mean over the ten splits, each with its own trained model: train and
  evaluate ten times (trial_1 .. trial_10) and merge the ten results with
  `cal_jax.evaluation.results.combine_runs`.

  Args:
    embed_fn: see `extract_features`; must not depend on anything but its
      inputs (each image is embedded once and its feature reused).
    test_split: the test split (`cal_jax.data.splits.load_splits`).
    dataset_name: builder name: "sysu_mm01", "regdb" or "llcm".
    settings: image size, batches, flip, parts, trials (ignored for RegDB)
      and, for SYSU-MM01 only, ``rand_perm_path``: the data set's
      ``exp/rand_perm_cam.mat``, which the galleries then follow instead of
      ``random.seed(trial)``.
    keys: protocol keys to run; default all of the data set's
      (`protocol_keys`).
    llcm_v2n_as_released: see `protocols.build_split`.
    local_devices: see `extract_features`.
    distribute: ``distribute(extract, indices)`` returns ``extract(indices)``,
      the features [N, D] of ``indices`` in order, however it shares the work;
      None calls ``extract`` directly. Multi-host runs pass
      `cal_jax.runtime.distributed.split_and_gather`.
    log: called with one line of progress per step.
    union_matrix_bytes: the largest probe x gallery-union distance matrix held
      whole (see the module doc); 0 always computes by probe chunks.
    cache: a `feature_cache.FeatureCache`: images it holds are not embedded,
      and those embedded are added to it.
    say: where progress lines go (count, rate, ETA) while images are embedded and
      protocols scored (`evaluation.progress`); None: none.

  Returns:
    The `Evaluation`; its results are {key: result}, result as
    `cal_jax.evaluation.results.summarize` gives it: R1, R5, R10, R20, mAP,
    mINP in percent (mean over trials), each with ``*_std``, ``trials``,
    ``gallery_draw`` and ``per_trial``.
  """
  keys = list(keys) if keys is not None else protocol_keys(dataset_name)
  allowed = protocol_keys(dataset_name)
  for key in keys:
    if key not in allowed:
      raise ValueError(
        f'protocol key {key!r} does not belong to data set {dataset_name!r}; its keys are {allowed}'
      )
  if not keys:
    raise ValueError('no protocol keys to evaluate')
  num_trials = settings.num_trials
  if num_trials < 1:
    raise ValueError(f'num_trials must be positive, got {num_trials}')
  rand_perm = None
  if settings.rand_perm_path:
    if dataset_name != 'sysu_mm01':
      raise ValueError('rand_perm_path only applies to SYSU-MM01')
    rand_perm = protocols.load_rand_perm(settings.rand_perm_path)

  table = protocols.RecordTable.of_columns(test_split)
  trials = [0] if dataset_name == 'regdb' else list(range(num_trials))
  splits = {
    key: [
      protocols.build_split(
        table, key, t, rand_perm=rand_perm, llcm_v2n_as_released=llcm_v2n_as_released
      )
      for t in trials
    ]
    for key in keys
  }
  if dataset_name == 'regdb':
    splits = _label_regdb(splits, settings.builder_config)

  groups = by_modalities(splits, table)
  start = time.perf_counter()
  features, row_of, embedded = _embed_all(
    embed_fn, test_split, splits, settings, local_devices, distribute, log, cache, say
  )
  timing = {'embedding': time.perf_counter() - start, 'distances': 0.0, 'metrics': 0.0}
  bad = ~np.all(np.isfinite(features), axis=1)
  if bad.any():
    raise NonFiniteFeaturesError(
      f'{int(bad.sum())} of {len(features)} test embeddings are not finite: the evaluated '
      'model has diverged (its parameters overflow at inference), so no metric can be computed'
    )
  out = {}
  for group in groups.values():
    start = time.perf_counter()
    distances = Distances(
      features,
      row_of,
      [s for key in group for s in splits[key]],
      settings.rerank,
      union_matrix_bytes,
    )
    timing['distances'] += time.perf_counter() - start
    log(
      f'distances of {len(distances.rows)} probes to '
      f'{len(distances.cols)} gallery images in '
      f'{time.perf_counter() - start:.1f} s'
      + ('' if distances.whole else ' (by probe chunks, in the metrics)')
    )
    for key in group:
      start = time.perf_counter()
      progress = Progress(
        f'protocol {key}: trial',
        len(splits[key]),
        'trials',
        say or _quiet,
        settings.progress_seconds,
      )
      per_trial = []
      for s in splits[key]:
        per_trial.append(score(distances, table, s))
        progress.update(len(per_trial))
      timing['metrics'] += time.perf_counter() - start
      out[key] = results_lib.summarize(per_trial, [s.gallery_draw for s in splits[key]])
      out[key]['rerank'] = settings.rerank.describe() if settings.rerank else 'none'
      r = out[key]
      log(
        f'{key}: R1 {r["R1"]:.2f} R10 {r["R10"]:.2f} mAP {r["mAP"]:.2f} '
        f'mINP {r["mINP"]:.2f} over {r["trials"]} trial(s) '
        f'({time.perf_counter() - start:.1f} s)'
      )
    timing['distances'] += distances.chunk_seconds
    timing['metrics'] -= distances.chunk_seconds
    del distances
  timing['images'] = float(embedded)
  timing['cached_images'] = float(len(features) - embedded)
  timing['images_per_second'] = embedded / max(timing['embedding'], 1e-9) if embedded else 0.0
  log(
    f'evaluation: embedding {timing["embedding"]:.1f} s ({embedded} images embedded, '
    f'{format_rate(timing["images_per_second"])} images/s; {len(features) - embedded} from the '
    'cache), '
    f'distances {timing["distances"]:.1f} s, metrics {timing["metrics"]:.1f} s'
  )
  return Evaluation({key: out[key] for key in keys}, features, row_of, splits, timing)


def _label_regdb(
  splits: dict[str, list[protocols.Split]], builder_config: str
) -> dict[str, list[protocols.Split]]:
  """Names the RegDB data split ('trial_t') in trial and gallery_draw."""
  if not builder_config:
    return splits
  number = builder_config.rsplit('_', 1)[-1]
  return {
    key: [
      dataclasses.replace(
        s,
        trial=int(number) if number.isdigit() else s.trial,
        gallery_draw=f'{s.gallery_draw} of {builder_config}',
      )
      for s in key_splits
    ]
    for key, key_splits in splits.items()
  }


def _quiet(line: str) -> None:
  del line


def _embed_all(
  embed_fn: EmbedFn,
  split: SplitArrays,
  splits: dict[str, list[protocols.Split]],
  settings: EvalSettings,
  local_devices: int | None,
  distribute: Distribute | None,
  log: Callable[[str], Any],
  cache: Any | None = None,
  say: Callable[[str], Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Embeds, once each, the images any split uses, one modality at a time.

  Returns:
    features [M, D] of the M distinct images used, [N] rows into it per
    example of ``split`` (-1 for an example no split uses), and how many of
    the M were embedded (the others came from ``cache``).
  """
  used = np.unique(
    np.concatenate(
      [np.concatenate([s.query, s.gallery]) for key_splits in splits.values() for s in key_splits]
    )
  )
  modalities = np.asarray(split.modality)[used]
  row_of = np.full(len(split), -1, np.int64)
  blocks = []
  num_rows = total_embedded = 0
  for modality in np.unique(modalities):
    indices = used[modalities == modality]
    start = time.perf_counter()
    name = MODALITY_NAMES.get(int(modality))
    progress = Progress(
      f'embedding {name} images', len(indices), 'images', say or _quiet, settings.progress_seconds
    )
    extract = functools.partial(
      extract_features,
      embed_fn,
      split,
      modality=int(modality),
      image_size=settings.image_size,
      batch_size=settings.batch_size,
      flip=settings.flip,
      num_parts=settings.num_parts,
      local_devices=local_devices,
      on_batch=progress.update,
    )
    block, missing = cache.lookup(indices) if cache is not None else (None, None)
    if block is None:
      block = distribute(extract, indices) if distribute else extract(indices)
      if cache is not None:
        cache.store(indices, block)
    elif missing.any():
      new = indices[missing]
      block[missing] = distribute(extract, new) if distribute else extract(new)
      cache.store(new, block[missing])
    blocks.append(block)
    row_of[indices] = num_rows + np.arange(len(indices))
    num_rows += len(indices)
    embedded = len(indices) if missing is None else int(missing.sum())
    total_embedded += embedded
    log(
      f'embedded {embedded} {MODALITY_NAMES.get(int(modality))} images '
      f'in {time.perf_counter() - start:.1f} s'
      + (f' ({len(indices) - embedded} from the feature cache)' if cache is not None else '')
    )
  if cache is not None:
    cache.write()  # once, after every modality
  return np.concatenate(blocks), row_of, total_embedded
