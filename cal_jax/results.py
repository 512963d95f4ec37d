"""Protocol results: per-trial aggregation, JSON files and the paper's tables.

A result (one protocol key) is a dict:
  R1, R5, R10, R20, mAP, mINP   mean over trials, percent
  R1_std, ..., mINP_std         standard deviation over trials (0 for one)
  trials                        number of trials averaged
  gallery_draw                  how the galleries were drawn (first .. last)
  per_trial                     [trials] dicts: trial, the six metrics,
                                num_valid_queries, num_gallery
A results dict maps protocol keys (`cal_jax.protocols.PROTOCOL_KEYS`) to
results; the JSON file written by `write_results` adds a 'meta' entry.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS = ("R1", "R5", "R10", "R20", "mAP", "mINP")
TABLE_METRICS = ("R1", "R10", "R20", "mAP", "mINP")
REQUIRED_META = ("checkpoint_step", "dataset")

# Row labels in the words of the paper's Tables 1 and 2 (and DEEN's for LLCM).
MODE_NAMES = {
    "sysu/all/single": "SYSU-MM01 all-search single-shot",
    "sysu/all/multi": "SYSU-MM01 all-search multi-shot",
    "sysu/indoor/single": "SYSU-MM01 indoor-search single-shot",
    "sysu/indoor/multi": "SYSU-MM01 indoor-search multi-shot",
    "regdb/v2t": "RegDB visible to infrared",
    "regdb/t2v": "RegDB infrared to visible",
    "llcm/v2n": "LLCM VIS to NIR",
    "llcm/n2v": "LLCM NIR to VIS",
}


def summarize(per_trial: Sequence[dict[str, Any]],
              gallery_draws: Sequence[str]) -> dict[str, Any]:
  """Mean and standard deviation over trials of one protocol key.

  Args:
    per_trial: [T] dicts holding at least the six `METRICS` (percent).
    gallery_draws: [T] the draw of each trial (`protocols.Split.gallery_draw`).

  Returns:
    A result (module docstring). The standard deviation is the sample one
    (ddof=1): the spread one expects between draws; 0 for a single trial.
  """
  if not per_trial:
    raise ValueError("no trials to summarise")
  if len(gallery_draws) != len(per_trial):
    raise ValueError(f"{len(gallery_draws)} gallery draws for "
                     f"{len(per_trial)} trials")
  out: dict[str, Any] = {}
  for name in METRICS:
    values = np.array([float(t[name]) for t in per_trial])
    out[name] = float(values.mean())
    out[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  out["trials"] = len(per_trial)
  out["gallery_draw"] = (gallery_draws[0] if len(gallery_draws) == 1 else
                         f"{gallery_draws[0]} .. {gallery_draws[-1]}")
  out["per_trial"] = [dict(t) for t in per_trial]
  return out


def combine_runs(runs: Sequence[dict[str, dict[str, Any]]]
                 ) -> dict[str, dict[str, Any]]:
  """Merges the results of separate runs into one (their trials pooled).

  RegDB's standard figure: ten models, one per data split trial_1..trial_10,
  each evaluated on its own test split; their ten results give one result of
  10 trials. Every run must hold the same protocol keys.
  """
  if not runs:
    raise ValueError("no runs to combine")
  keys = [k for k in runs[0] if k != "meta"]
  for run in runs[1:]:
    if sorted(k for k in run if k != "meta") != sorted(keys):
      raise ValueError(f"runs hold different protocol keys: {sorted(keys)} "
                       f"and {sorted(k for k in run if k != 'meta')}")
  out = {}
  for key in keys:
    per_trial, draws = [], []
    for run in runs:
      per_trial += run[key]["per_trial"]
      draws += [run[key]["gallery_draw"]] * len(run[key]["per_trial"])
    out[key] = summarize(per_trial, draws)
    out[key]["gallery_draw"] = "; ".join(r[key]["gallery_draw"] for r in runs)
  return out


def write_results(path: str, results: dict[str, dict[str, Any]],
                  meta: dict[str, Any]) -> None:
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
    raise ValueError(f"meta lacks {missing}: a result must say which "
                     "checkpoint and data set it comes from")
  if "meta" in results:
    raise ValueError("'meta' is not a protocol key")
  meta = dict(meta)
  meta.setdefault("date", datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds"))
  meta.setdefault("gallery_draw",
                  {k: r["gallery_draw"] for k, r in results.items()})
  text = json.dumps({**results, "meta": meta}, indent=2, allow_nan=False,
                    default=_to_json)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def read_results(path: str) -> tuple[dict[str, dict[str, Any]],
                                     dict[str, Any]]:
  """Reads a file of `write_results`: ({key: result}, meta)."""
  with open(path, encoding="utf-8") as f:
    payload = json.load(f)
  meta = payload.pop("meta", {})
  return payload, meta


def _to_json(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A Markdown table in the layout of the paper's Tables 1 and 2.

  One row per protocol key (SYSU-MM01 modes, then RegDB, then LLCM
  directions), columns R1, R10, R20, mAP, mINP in percent, "mean ± std" when
  a key averages more than one trial, and the number of trials.
  """
  keys = [k for k in MODE_NAMES if k in results]
  keys += sorted(k for k in results if k not in MODE_NAMES and k != "meta")
  header = ["key", "protocol and mode"] + list(TABLE_METRICS) + ["trials"]
  rows = []
  for key in keys:
    result = results[key]
    trials = int(result.get("trials", 1))
    cells = []
    for name in TABLE_METRICS:
      cell = f"{result[name]:.2f}"
      if trials > 1:
        cell += f" ± {result.get(name + '_std', 0.0):.2f}"
      cells.append(cell)
    rows.append([key, MODE_NAMES.get(key, key)] + cells + [str(trials)])
  widths = [max(len(r[i]) for r in [header] + rows)
            for i in range(len(header))]

  def line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

  rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(header), rule] + [line(r) for r in rows])
