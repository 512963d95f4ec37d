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
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from cal_jax import workdir as workdir_lib
from cal_jax.training import checkpoint_files
from cal_jax.training.checkpoint_files import (compatibility_fingerprint,
                                              fingerprint_differences, to_json)
from cal_jax.training.state import TrainState

BEST_METRIC = 'mAP'


class IncompatibleCheckpointError(ValueError):
  """A checkpoint was written for a network or class count other than the config's."""


class DamagedCheckpointError(ValueError):
  """No committed checkpoint (or not the one asked for) can be read back."""


def _is_primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


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
    self._pending: Optional[int] = None  # saved, not yet known to be committed

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
    self._finish_pending()
    try:
      saved = bool(self._manager.save(int(step), args=args, metrics=metrics))
    except Exception as error:  # pylint: disable=broad-except  (the previous save's, too)
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
    if BEST_METRIC not in metrics or not math.isfinite(float(metrics[BEST_METRIC])):
      raise ValueError(f"metrics must contain a finite '{BEST_METRIC}'; got {metrics}.")
    self._finish_pending()
    if _is_primary():
      workdir_lib.write_text_atomically(
          os.path.join(self._step_dir(step), checkpoint_files.METRICS_ITEM, checkpoint_files.METRICS_ITEM),
          json.dumps({str(k): float(v) for k, v in metrics.items()}))
    _sync(f'cal_jax_record_metrics_{step}')
    self._manager.reload()

  def has_metrics(self, step: int) -> bool:
    """Whether the committed `step` has evaluation metrics."""
    return os.path.isfile(os.path.join(self._step_dir(step), checkpoint_files.METRICS_ITEM, checkpoint_files.METRICS_ITEM))

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def _finish_pending(self) -> None:
    """Waits for the last save; once it is committed, writes its manifest."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      self._after_failed_save()
      self._raise_if_disk_full(error, step)
      raise
    if _is_primary() and os.path.isdir(self._step_dir(step)):
      files = checkpoint_files.step_files(self._step_dir(step))
      try:
        workdir_lib.write_text_atomically(os.path.join(self._step_dir(step), checkpoint_files.MANIFEST),
                                          json.dumps(files, sort_keys=True))
      except OSError as error:  # the step itself is committed; only the check is lost
        self._raise_if_disk_full(error, step)
        raise

  def _after_failed_save(self, quiet_s: float = 1.0, limit_s: float = 60.0) -> None:
    """When one item of a save fails, the others' writes (TensorStore's threads) go on:
    waits until the partial folders have not changed for `quiet_s`, so that those writes
    end while the manager still listens for them and re-create nothing once the
    folders are removed."""
    start = last_change = time.monotonic()
    seen = checkpoint_files.partial_files(self.directory)
    while time.monotonic() - last_change < quiet_s and time.monotonic() - start < limit_s:
      time.sleep(0.1)
      now = checkpoint_files.partial_files(self.directory)
      if now != seen:
        seen, last_change = now, time.monotonic()
    self._remove_partial_steps()

  def _remove_partial_steps(self) -> list[str]:
    """Removes the `*.orbax-checkpoint-tmp*` folders of saves that did not commit."""
    return checkpoint_files.remove_partial_steps(self.directory) if _is_primary() else []

  def _raise_if_disk_full(self, error: BaseException, step: int) -> None:
    """Re-raises an ENOSPC of a save as one WorkdirError naming the disk."""
    if not checkpoint_files.is_disk_full(error):
      return
    self._remove_partial_steps()
    self._manager.reload()
    raise checkpoint_files.disk_full_error(self.directory, step, self.all_steps()) from error

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

  def damage(self, step: int) -> Optional[str]:
    """What is wrong with the committed `step`, naming the file; None if nothing is seen.

    Checks that the files every step holds are there, that the meta item is
    JSON, and, when the step has its manifest, each file's size and CRC-32.
    A step without a manifest (its writer was killed right after the commit)
    is checked by reading it (`restore`).
    """
    return checkpoint_files.damage(self._step_dir(step))

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step out of the checkpoint folder (nothing is deleted)."""
    target_root = self.directory.rstrip(os.sep) + '.damaged'
    target = os.path.join(target_root, str(step))
    if _is_primary():
      os.makedirs(target_root, exist_ok=True)
      if os.path.exists(target):
        target += time.strftime('-%Y%m%d-%H%M%S')
      os.replace(self._step_dir(step), target)
    _sync(f'cal_jax_set_aside_{step}')
    self._manager.reload()
    return target

  def latest_intact_step(self, *, set_aside: bool = False,
                         read_errors: Optional[dict[int, str]] = None) -> Optional[int]:
    """The newest committed step that `damage` finds nothing wrong with, or None.

    Each newer, damaged step is named in a warning (and, with `set_aside`,
    moved to `<directory>.damaged/`, so that training can save that step again).

    Args:
      read_errors: {step: problem} of steps that failed to be read back.
    Raises:
      DamagedCheckpointError: steps exist, but every one is damaged (none is moved).
    """
    damaged, intact = [], None
    for step in sorted(self._manager.all_steps(), reverse=True):
      problem = (read_errors or {}).get(step) or self.damage(step)
      if problem is None:
        intact = step
        break
      damaged.append((step, problem))
    if damaged and intact is None:
      raise DamagedCheckpointError(
          f'every checkpoint in {self.directory} is damaged: '
          + '; '.join(f'step {s}: {p}' for s, p in damaged)
          + '. Restore the folder from a copy, or start another --workdir.')
    for step, problem in damaged:
      aside = f' (moved to {self._set_aside(step)})' if set_aside else ''
      logging.warning('The checkpoint of step %d in %s is damaged: %s; using step %d, the '
                      'newest intact one%s.', step, self.directory, problem, intact, aside)
    return intact

  def restore(self, template: TrainState, step: Optional[int] = None, *,
              set_aside_damaged: bool = False) -> tuple[TrainState, dict[str, Any]]:
    """The train state and `extra` saved at `step` (default: the latest intact one).

    Without `step`, a damaged latest step (`damage`, or an error while it is
    read) is skipped with a warning for the newest intact one.

    Args:
      template: an unreplicated train state of the config's network (e.g. a
        freshly created one); it gives the tree, shapes, dtypes and array
        types, and its `apply_fn` and `tx` are kept.
      step: which committed step; None for the latest intact one.
      set_aside_damaged: move skipped damaged steps to `<directory>.damaged/`.
    Raises:
      FileNotFoundError: no committed checkpoint (or not that step).
      DamagedCheckpointError: `step` (or every step) is damaged.
      IncompatibleCheckpointError: the checkpoint's fingerprint differs.
    """
    if step is None:
      if self.latest_step() is None:
        raise FileNotFoundError(f'No complete checkpoint in {self.directory}.')
      read_errors = {}
      while True:
        latest = self.latest_intact_step(set_aside=set_aside_damaged, read_errors=read_errors)
        try:
          return self._restore_step(template, latest)
        except IncompatibleCheckpointError:
          raise
        except Exception as error:  # pylint: disable=broad-except  (tensorstore's own)
          read_errors[latest] = self._read_problem(latest, error)
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
          f'No complete checkpoint for step {step} in {self.directory}; '
          f'the committed steps are {self.all_steps()}.')
    problem = self.damage(step)
    if problem is None:
      try:
        return self._restore_step(template, step)
      except IncompatibleCheckpointError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        problem = self._read_problem(step, error)
    raise DamagedCheckpointError(
        f'The checkpoint of step {step} in {self.directory} is damaged: {problem}. The '
        f'committed steps are {self.all_steps()}; choose another, or restore the step '
        'from a copy.')

  def _read_problem(self, step: int, error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [''])[0][:300]
    return (f'{os.path.join(self._step_dir(step), "state")} cannot be read '
            f'({type(error).__name__}: {first_line})')

  def _restore_step(self, template: TrainState, step: int) -> tuple[TrainState, dict[str, Any]]:
    meta = self.check_compatible(step)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored.state, meta['extra']

  def wait_until_finished(self) -> None:
    """Blocks until the last asynchronous save is committed."""
    self._finish_pending()
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and deletions, then releases the manager.

    Whatever happens, what a failed background save left behind (a
    `*.orbax-checkpoint-tmp*` folder) is removed, so the next run starts clean.
    """
    try:
      self._finish_pending()
      self._manager.wait_until_finished()
    finally:
      self._manager.close()
      removed = self._remove_partial_steps()
      if removed:
        logging.warning('Removed the partial checkpoint(s) %s of a save that failed, in %s.',
                        ', '.join(removed), self.directory)

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def committed_steps(directory: str) -> list[int]:
  """The committed steps of a checkpoint folder, read only (nothing is created or removed)."""
  reader = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return sorted(reader.all_steps())
  finally:
    reader.close()


def saved_meta(directory: str, step: int) -> dict[str, Any]:
  """The `meta` item of a committed step ('fingerprint' and 'extra'), read only."""
  reader = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return reader.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  finally:
    reader.close()
