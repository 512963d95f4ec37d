"""Protocol results: per-trial aggregation, JSON files and the paper's tables.

A result (one protocol key) is a dict:
  R1, R5, R10, R20, mAP, mINP   mean over trials, percent
  R1_std, ..., mINP_std         standard deviation over trials (0 for one)
  trials                        number of trials averaged
  gallery_draw                  how the galleries were drawn (first .. last)
  cmc                           the mean CMC curve, percent at ranks 1..20
                                (absent in files of older versions)
  per_trial                     [trials] dicts: trial, the six metrics,
                                num_valid_queries, num_gallery, cmc
A results dict maps protocol keys (`protocols.PROTOCOL_KEYS`) to
results; the JSON file written by `write_results` adds a 'meta' entry.

`results_path`: a workdir's `eval_results.json` holds the newest evaluated
step's results; evaluating an older step (a fall back, `--checkpoint`) writes
`eval_results_step<N>.json` beside it instead of replacing them.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cal_jax.data.datasets import specs
from cal_jax.runtime import workdir as workdir_lib

METRICS = ('R1', 'R5', 'R10', 'R20', 'mAP', 'mINP')
TABLE_METRICS = ('R1', 'R10', 'R20', 'mAP', 'mINP')
REQUIRED_META = ('checkpoint_step', 'dataset')

# Row labels in the words of the paper's Tables 1 and 2 (and DEEN's for LLCM).
MODE_NAMES = specs.MODE_NAMES


def summarize(per_trial: Sequence[dict[str, Any]], gallery_draws: Sequence[str]) -> dict[str, Any]:
  """Mean and standard deviation over trials of one protocol key.

  Args:
    per_trial: [T] dicts holding at least the six `METRICS` (percent).
    gallery_draws: [T] the draw of each trial (`protocols.Split.gallery_draw`).

  Returns:
    A result (module docstring). The standard deviation is the sample one
    (ddof=1): the spread one expects between draws; 0 for a single trial.
  """
  if not per_trial:
    raise ValueError('no trials to summarise')
  if len(gallery_draws) != len(per_trial):
    raise ValueError(f'{len(gallery_draws)} gallery draws for {len(per_trial)} trials')
  out: dict[str, Any] = {}
  for name in METRICS:
    values = np.array([float(t[name]) for t in per_trial])
    out[name] = float(values.mean())
    out[f'{name}_std'] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  out['trials'] = len(per_trial)
  curves = [t['cmc'] for t in per_trial if 'cmc' in t]
  if curves and len(curves) == len(per_trial):
    out['cmc'] = mean_curve(curves)
  out['gallery_draw'] = (
    gallery_draws[0] if len(gallery_draws) == 1 else f'{gallery_draws[0]} .. {gallery_draws[-1]}'
  )
  out['per_trial'] = [dict(t) for t in per_trial]
  return out


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
  """Mean of CMC curves; a shorter curve (a gallery under 20 images) keeps its
  last value, as `metrics.evaluate_ranking` extends its own."""
  length = max(len(c) for c in curves)
  padded = np.array([list(c) + [c[-1]] * (length - len(c)) for c in curves], np.float64)
  return padded.mean(axis=0).tolist()


def combine_runs(runs: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
  """Merges the results of separate runs into one (their trials pooled).

  RegDB's standard figure: ten models, one per data split trial_1..trial_10,
  each evaluated on its own test split; their ten results give one result of
  10 trials. Every run must hold the same protocol keys.
  """
  if not runs:
    raise ValueError('no runs to combine')
  keys = [k for k in runs[0] if k != 'meta']
  for run in runs[1:]:
    if sorted(k for k in run if k != 'meta') != sorted(keys):
      raise ValueError(
        f'runs hold different protocol keys: {sorted(keys)} '
        f'and {sorted(k for k in run if k != "meta")}'
      )
  out = {}
  for key in keys:
    per_trial, draws = [], []
    for run in runs:
      per_trial += run[key]['per_trial']
      draws += [run[key]['gallery_draw']] * len(run[key]['per_trial'])
    out[key] = summarize(per_trial, draws)
    out[key]['gallery_draw'] = '; '.join(r[key]['gallery_draw'] for r in runs)
  return out


def write_results(path: str, results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
  """Writes results and their 'meta' entry as one JSON file, atomically.

  The text goes to a temporary file in the same folder, which then replaces
  ``path`` (``os.replace``): a reader sees the old file or the new one, never
  a half-written one.

  Args:
    path: the JSON file (a local path).
    results: {protocol key: result}.
    meta: must hold 'checkpoint_step' and 'dataset'; 'date' (UTC, ISO 8601)
      and 'gallery_draw' ({key: draw}) are added when absent. Anything else
      (builder config, checkpoint path, config) is kept as given.
  """
  missing = [k for k in REQUIRED_META if k not in meta]
  if missing:
    raise ValueError(
      f'meta lacks {missing}: a result must say which checkpoint and data set it comes from'
    )
  if 'meta' in results:
    raise ValueError("'meta' is not a protocol key")
  meta = dict(meta)
  meta.setdefault('date', datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'))
  meta.setdefault('gallery_draw', {k: r['gallery_draw'] for k, r in results.items()})
  text = json.dumps({**results, 'meta': meta}, indent=2, allow_nan=False, default=_to_json)
  workdir_lib.write_text_atomically(path, text + '\n')


RESULTS_FILE = 'eval_results.json'


def results_path(workdir: str, step: int) -> str:
  """Where the results of `step` go: WORKDIR/eval_results.json, unless it holds the
  results of a newer step (or cannot be read): then WORKDIR/eval_results_step<step>.json,
  so that the results of one step never replace another's."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return path
  try:
    _, meta = read_results(path)
    newest = int(meta['checkpoint_step'])
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    newest = None
  if newest is not None and newest <= int(step):
    return path
  return os.path.join(workdir, f'eval_results_step{int(step)}.json')


def read_results(path: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
  """Reads a file of `write_results`: ({key: result}, meta)."""
  with open(path, encoding='utf-8') as f:
    payload = json.load(f)
  meta = payload.pop('meta', {})
  return payload, meta


def _to_json(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f'{type(value).__name__} is not JSON serialisable')


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """Fixed-width text tables in the layout of the paper's Tables 1 and 2.

  One table per data set (SYSU-MM01 as Table 1, RegDB as Table 2, then LLCM),
  one column group per protocol mode with R1, R10, R20, mAP and mINP in
  percent, a row of means and a row of standard deviations over the trials
  ("-" for a mode of one trial, so that one trial cannot pass for ten).
  """
  keys = [k for k in MODE_NAMES if k in results]
  keys += sorted(k for k in results if k not in MODE_NAMES and k != 'meta')
  by_dataset: dict[str, list[str]] = {}
  for key in keys:
    by_dataset.setdefault(key.split('/', 1)[0], []).append(key)
  return '\n\n'.join(_dataset_table(prefix, group, results) for prefix, group in by_dataset.items())


def _dataset_table(prefix: str, keys: Sequence[str], results: dict[str, dict[str, Any]]) -> str:
  width = _CELL * len(TABLE_METRICS) + len(TABLE_METRICS) - 1
  groups, metrics, means, stds = [], [], [], []
  for key in keys:
    result = results[key]
    trials = int(result.get('trials', 1))
    label = f'{_MODE_LABELS.get(key, key)}, {trials} trial{"s" * (trials > 1)}'
    groups.append(label.ljust(width))
    metrics.append(' '.join(name.rjust(_CELL) for name in TABLE_METRICS))
    means.append(' '.join(f'{result[name]:{_CELL}.2f}' for name in TABLE_METRICS))
    stds.append(
      ' '.join(
        (f'{result.get(name + "_std", 0.0):{_CELL}.2f}' if trials > 1 else '-'.rjust(_CELL))
        for name in TABLE_METRICS
      )
    )
  title = _TITLES.get(prefix, prefix)
  reranked = sorted({results[k].get('rerank', 'none') for k in keys} - {'none'})
  if reranked:
    title += ', re-ranked: ' + ', '.join(reranked)
  lines = [title]
  for label, cells in (('', groups), ('', metrics), ('mean', means), ('std', stds)):
    lines.append((label.ljust(4) + '  ' + '  '.join(cells)).rstrip())
  return '\n'.join(lines)


_CELL = 7
_TITLES = {spec.short: spec.table_title for spec in specs.SPECS.values()}
# Column-group labels: the mode, in the words of the paper's table headers.
_MODE_LABELS = {key: name.split(' ', 1)[1] for key, name in MODE_NAMES.items()}
