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

What orbax does not do is done here: `record_metrics` (the mAP of a step saved
before it was evaluated), the manifest and `damage` of every step (a damaged
latest step is skipped for the newest intact one, named in a warning), full
disks (one `WorkdirError` naming the disk; the partial step is removed) and no
leftovers (`close()` removes the `*.orbax-checkpoint-tmp*` folder of a failed
save). The file checks themselves are `checkpoint_files`'.
"""

import json
import math
import os
from typing import Any

import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from cal_jax.runtime import workdir as workdir_lib
from cal_jax.training import checkpoint_files, checkpoint_reader
from cal_jax.training.checkpoint_files import (
  compatibility_fingerprint,
  to_json,
)
from cal_jax.training.checkpoint_reader import (  # noqa: F401  (re-exported: one import for callers)
  CheckpointReader,
  DamagedCheckpointError,
  IncompatibleCheckpointError,
  committed_steps,
  is_primary,
  saved_meta,
  sync,
)
from cal_jax.training.state import TrainState

BEST_METRIC = 'mAP'


def _checked_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  """`metrics` as floats; a ValueError unless they hold a finite mAP (it ranks the steps)."""
  if BEST_METRIC not in metrics:
    raise ValueError(
      f"metrics must contain '{BEST_METRIC}' to rank checkpoints; got {sorted(metrics)}."
    )
  metrics = {str(k): float(v) for k, v in metrics.items()}
  if not math.isfinite(metrics[BEST_METRIC]):
    raise ValueError(f'{BEST_METRIC} is not finite: {metrics[BEST_METRIC]}.')
  return metrics


def mean_average_precision(metrics: dict[str, Any]) -> float:
  """The metric that ranks checkpoints (higher is better)."""
  return float(metrics[BEST_METRIC])


class Checkpointer(CheckpointReader):
  """Saves and restores a run's checkpoints in one directory (the workdir's); the
  reading side (restore, damaged steps) is `CheckpointReader`'s.

  Use as a context manager or call `close()`: closing waits for the last
  asynchronous save, so the latest step on disk is always complete.
  """

  def __init__(
    self,
    directory: str,
    config: Any,
    num_classes: int,
    *,
    keep: int = 3,
    keep_best: bool = True,
    async_save: bool = True,
    read_only: bool = False,
  ):
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
      read_only: restore only (evaluation, export): nothing in `directory` is
        written or moved, and no step's metrics are read until it is checked.
        Otherwise a step whose metrics file is damaged (orbax reads them all
        first) is named in a warning and moved to `<directory>.damaged/`.
    """
    if keep < 1:
      raise ValueError(f'keep must be at least 1 (the latest step), got {keep}.')
    self.fingerprint = compatibility_fingerprint(config, num_classes)
    self._pending: int | None = None  # saved, not yet known to be committed
    self._read_only = read_only
    if read_only:
      self._manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=checkpoint_reader.read_only_options()
      )
      return
    if is_primary():
      checkpoint_files.set_aside_damaged_metrics(os.path.abspath(directory))
    sync('cal_jax_damaged_metrics')
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(
        checkpoint_managers.BestN(
          get_metric_fn=mean_average_precision,
          reverse=False,
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      best_fn=mean_average_precision,
      best_mode='max',
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    # Orbax needs an absolute path; the command lines resolve theirs already.
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def save(
    self, step: int, state: TrainState, extra: dict[str, Any], metrics: dict[str, Any] | None = None
  ) -> bool:
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
      metrics = _checked_metrics(metrics)
    meta = {'fingerprint': self.fingerprint, 'extra': to_json(extra)}
    # Committed with the state: they check a step whose manifest was never written.
    meta['meta_digest'] = checkpoint_files.meta_digest(meta)
    meta['state_digest'] = checkpoint_files.state_digest(state)
    json.dumps(meta)  # fail here, not in the background thread, on a non-JSON value
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._finish_pending()
    try:
      saved = bool(self._manager.save(int(step), args=args, metrics=metrics))
    except Exception as error:  # the previous save's, too
      self._after_failed_save()
      self._raise_if_disk_full(error, step)
      raise
    if saved:
      self._pending = int(step)
    return saved

  def record_metrics(self, step: int, metrics: dict[str, Any]) -> None:
    """Attaches evaluation `metrics` (with 'mAP') to the committed `step`.

    For a step saved before it was evaluated. What orbax would have written
    had `save` been given the metrics: the step's `metrics/metrics` JSON; the
    manager then re-reads the directory, so the best-step policy counts it
    from the next save on (and after a restart).
    """
    metrics = _checked_metrics(metrics)
    self._finish_pending()
    if is_primary():
      workdir_lib.write_text_atomically(self._metrics_file(step), json.dumps(metrics))
      if checkpoint_files.has_manifest(self._step_dir(step)):  # it covers the metrics too
        self._write_manifest(step)
    sync(f'cal_jax_record_metrics_{step}')
    self._manager.reload()

  def has_metrics(self, step: int) -> bool:
    """Whether the committed `step` has evaluation metrics."""
    return os.path.isfile(self._metrics_file(step))

  def _metrics_file(self, step: int) -> str:
    item = checkpoint_files.METRICS_ITEM
    return os.path.join(self._step_dir(step), item, item)

  def _finish_pending(self) -> None:
    """Waits for the last save; once it is committed, writes its manifest."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as error:
      self._after_failed_save()
      self._raise_if_disk_full(error, step)
      raise
    if is_primary() and os.path.isdir(self._step_dir(step)):
      try:
        self._write_manifest(step)
      except OSError as error:  # the step is committed, and its digests check it
        if not checkpoint_files.is_disk_full(error):
          raise
        logging.info('No room for the file list of step %d; its digests check it.', step)

  def _write_manifest(self, step: int) -> None:
    files = checkpoint_files.step_files(self._step_dir(step))
    workdir_lib.write_text_atomically(
      os.path.join(self._step_dir(step), checkpoint_files.MANIFEST),
      json.dumps(files, sort_keys=True),
    )

  def _after_failed_save(self, quiet_s: float = 1.0, limit_s: float = 60.0) -> None:
    """When one item of a save fails, the others' writes (TensorStore's threads) go on:
    waits until the partial folders have not changed for `quiet_s`, so that those writes
    end while the manager still listens for them and re-create nothing once the
    folders are removed."""
    checkpoint_files.wait_until_unchanged(self.directory, quiet_s, limit_s)
    self._remove_partial_steps()

  def _remove_partial_steps(self) -> list[str]:
    """Removes the `*.orbax-checkpoint-tmp*` folders of saves that did not commit."""
    if self._read_only or not is_primary():
      return []
    return checkpoint_files.remove_partial_steps(self.directory)

  def _raise_if_disk_full(self, error: BaseException, step: int) -> None:
    """Re-raises an ENOSPC of a save as one WorkdirError naming the disk."""
    if not checkpoint_files.is_disk_full(error):
      return
    self._remove_partial_steps()
    self._manager.reload()
    raise checkpoint_files.disk_full_error(self.directory, step, self.all_steps()) from error

  def wait_until_finished(self) -> None:
    """Blocks until the last asynchronous save is committed."""
    self._finish_pending()
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and deletions, then releases the manager.

    Whatever happens, what a failed background save left behind (a
    `*.orbax-checkpoint-tmp*` folder) is removed, so the next run starts clean,
    and the first error is the one raised (the manager's own close meets it again).
    """
    failed = True
    try:
      self._finish_pending()
      self._manager.wait_until_finished()
      failed = False
    finally:
      try:
        self._manager.close()
      except Exception as error:  # the same failed save, met again
        if not failed:
          raise
        logging.info('Closing the checkpoint manager failed as well: %s', error)
      removed = self._remove_partial_steps()
      if removed:
        logging.warning(
          'Removed the partial checkpoint(s) %s of a save that failed, in %s.',
          ', '.join(removed),
          self.directory,
        )

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
