"""Checkpoints of a CAL run: the train state, the data-pipeline position, and
the fingerprint of the configuration that produced them.

Each step is one directory `<workdir>/<step>/` written by an orbax
`CheckpointManager` with three items:

  state/    the unreplicated `TrainState` (params, batch_stats, opt_state, step)
  meta/     JSON: `fingerprint` (see `compatibility_fingerprint`) and `extra`,
            the caller's JSON-able resume information (data-pipeline step,
            epoch, assignment counts, ...)
  metrics/  JSON, written by orbax when `save` is given metrics (e.g. mAP)

Retention is one orbax preservation policy, the union of two:
`LatestN(keep)`, which keeps the `keep` most recent steps, so the latest is
never deleted, and `BestN(n=1)` on `metrics['mAP']`, which keeps the best
evaluated step however old it is (steps saved without metrics never count as
best). A run therefore holds at most `keep + 1` checkpoints. One manager in one
directory suffices; orbax reads the metrics back when a run resumes, so the
best step survives restarts.

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp...` and
renames it to `<step>` only once every item is on disk, so a process killed
mid-save leaves a temporary directory that `latest_step` never lists (and that
the next `Checkpointer` removes); `restore` then returns the previous good step.

Multi-host: every process constructs the `Checkpointer` and calls `save`,
`restore` and `close` with the same arguments; orbax synchronises the
processes, and process 0 alone writes the host (numpy) arrays and the JSON
items, commits the rename and deletes old steps.
"""

import json
import math
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from cal_jax.train_state import TrainState

FINGERPRINT_FIELDS = ('depth', 'width', 'last_stride', 'modality_specific_stem', 'num_parts',
                      'pool_sizes', 'shared_region_mining', 'adapter_hidden', 'adapter_dim',
                      'channel_reduction')
BEST_METRIC = 'mAP'
_MISSING = '<missing>'


class IncompatibleCheckpointError(ValueError):
  """A checkpoint was written for a network or class count other than the config's."""


def to_json(tree: Any) -> Any:
  """`tree` with numpy scalars and arrays made plain Python (tuples become lists)."""
  if isinstance(tree, dict):
    return {str(k): to_json(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [to_json(v) for v in tree]
  if isinstance(tree, (np.ndarray, jax.Array)):
    return np.asarray(tree).tolist()
  if isinstance(tree, np.generic):
    return tree.item()
  return tree


def compatibility_fingerprint(config: Any, num_classes: int) -> dict[str, Any]:
  """The settings that fix the shapes of the train state, as plain JSON values.

  Two configs with equal fingerprints can restore each other's checkpoints;
  the remaining settings (losses, learning rate, augmentation) may differ.
  """
  fingerprint = {name: to_json(config.model[name]) for name in FINGERPRINT_FIELDS}
  fingerprint['num_classes'] = int(num_classes)
  return fingerprint


def fingerprint_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  """One line `name: checkpoint=X, config=Y` per differing field, sorted by name."""
  lines = []
  for name in sorted(set(saved) | set(wanted)):
    have, want = saved.get(name, _MISSING), wanted.get(name, _MISSING)
    if have != want:
      lines.append(f'{name}: checkpoint={have!r}, config={want!r}')
  return lines


def mean_average_precision(metrics: dict[str, Any]) -> float:
  """The metric that ranks checkpoints (higher is better)."""
  return float(metrics[BEST_METRIC])


class Checkpointer:
  """Saves and restores a run's checkpoints in one directory (the workdir's).

  Use as a context manager or call `close()`: closing waits for the last
  asynchronous save, so the latest step on disk is always complete.
  """

  def __init__(self, directory: str, config: Any, num_classes: int, *, keep: int = 3,
               keep_best: bool = True, async_save: bool = True):
    """
    Args:
      directory: where the step directories live; created if missing.
      config: the run's config; its `compatibility_fingerprint` is stored with
        every step and checked on restore.
      num_classes: identities of the training set (the classifiers' width).
      keep: how many of the most recent steps to keep (at least 1).
      keep_best: also keep the step with the highest `metrics['mAP']`.
      async_save: write in a background thread; `save` returns once the
        arrays are copied to the host.
    """
    if keep < 1:
      raise ValueError(f'keep must be at least 1 (the latest step), got {keep}.')
    self.fingerprint = compatibility_fingerprint(config, num_classes)
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=mean_average_precision, reverse=False, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=mean_average_precision, best_mode='max',
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    # Orbax needs an absolute path; the command lines resolve theirs already.
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  def all_steps(self) -> list[int]:
    """The committed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The most recent committed step, or None."""
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    """The kept step with the highest mAP, or None if no kept step has metrics."""
    return self._manager.best_step()

  def save(self, step: int, state: TrainState, extra: dict[str, Any],
           metrics: Optional[dict[str, Any]] = None) -> bool:
    """Starts writing `state` (unreplicated) and `extra` as `step`.

    Returns False, writing nothing, when `step` is not after the latest saved
    step. Host arrays are copied before this returns, so the caller may go on
    training; the previous asynchronous save is waited for first.

    Args:
      step: the training step the state has completed.
      state: the unreplicated train state (host numpy or jax arrays).
      extra: JSON-able resume information (numpy values are converted).
      metrics: evaluation results at this step; must hold 'mAP' if given.
    """
    if metrics is not None:
      if BEST_METRIC not in metrics:
        raise ValueError(f"metrics must contain '{BEST_METRIC}' to rank checkpoints; "
                         f'got {sorted(metrics)}.')
      metrics = {str(k): float(v) for k, v in metrics.items()}
      if not math.isfinite(metrics[BEST_METRIC]):
        raise ValueError(f'{BEST_METRIC} is not finite: {metrics[BEST_METRIC]}.')
    meta = {'fingerprint': self.fingerprint, 'extra': to_json(extra)}
    json.dumps(meta)  # fail here, not in the background thread, on a non-JSON value
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta))
    return bool(self._manager.save(int(step), args=args, metrics=metrics))

  def check_compatible(self, step: int) -> dict[str, Any]:
    """The `meta` item of `step`, after checking its fingerprint against the config's.

    Raises:
      IncompatibleCheckpointError: listing every differing field.
    """
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    differences = fingerprint_differences(meta.get('fingerprint', {}), self.fingerprint)
    if differences:
      raise IncompatibleCheckpointError(
          f'The checkpoint at step {step} in {self.directory} was written for another '
          'network:\n  ' + '\n  '.join(differences) + '\n'
          'Start a fresh run with another --workdir, or resume with the config that '
          'wrote this checkpoint.')
    return meta

  def restore(self, template: TrainState, step: Optional[int] = None
              ) -> tuple[TrainState, dict[str, Any]]:
    """The train state and `extra` saved at `step` (default: the latest).

    Args:
      template: an unreplicated train state of the config's network (e.g. a
        freshly created one); it gives the tree, shapes, dtypes and array
        types, and its `apply_fn` and `tx` are kept.
      step: which committed step; None for the latest.
    Raises:
      FileNotFoundError: no committed checkpoint (or not that step).
      IncompatibleCheckpointError: the checkpoint's fingerprint differs.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'No complete checkpoint in {self.directory}.')
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(
          f'No complete checkpoint for step {step} in {self.directory}; '
          f'the committed steps are {self.all_steps()}.')
    meta = self.check_compatible(step)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored.state, meta['extra']

  def wait_until_finished(self) -> None:
    """Blocks until the last asynchronous save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and deletions, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def restore_or_none(checkpointer: Checkpointer, template: TrainState
                    ) -> Optional[tuple[TrainState, dict[str, Any]]]:
  """The latest (state, extra), or None when the directory holds no checkpoint."""
  if checkpointer.latest_step() is None:
    return None
  return checkpointer.restore(template)
