"""Reading a run's checkpoints back: `restore`, and the fall-back past damaged steps.

`CheckpointReader` is the reading half of `checkpointing.Checkpointer`: the
latest intact step (a damaged newer one is named in a warning and may be set
aside into `<directory>.damaged/`), the compatibility check of a step's
fingerprint against the config's, and the restore itself. `committed_steps`
and `saved_meta` read a folder without a manager of one's own (the export).
"""

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from cal_jax.training import checkpoint_files
from cal_jax.training.checkpoint_files import fingerprint_differences
from cal_jax.training.state import TrainState


def read_only_options() -> ocp.CheckpointManagerOptions:
  """Of a manager that only reads: the metrics files, which orbax reads first and which
  may be damaged, are not read at start (`damage` checks them, naming the file)."""
  return ocp.CheckpointManagerOptions(
    read_only=True, lightweight_initialize=True, save_interval_steps=0, create=False
  )


class IncompatibleCheckpointError(ValueError):
  """A checkpoint was written for a network or class count other than the config's."""


class DamagedCheckpointError(ValueError):
  """No committed checkpoint (or not the one asked for) can be read back."""


class _FailedCheck(Exception):
  """A step read back that does not hold what was saved, or that cannot be checked."""


def is_primary() -> bool:
  return jax.process_index() == 0


def sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


class CheckpointReader:
  """The reading half of a `Checkpointer`.

  Attributes (set by the subclass):
    fingerprint: the config's `compatibility_fingerprint`.
    _manager: the orbax `CheckpointManager` of the directory.
  """

  fingerprint: dict[str, Any]
  _manager: ocp.CheckpointManager

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  def all_steps(self) -> list[int]:
    """The committed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The most recent committed step, or None."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the highest mAP, or None if no kept step has metrics."""
    return self._manager.best_step()

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

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
        'Start a fresh run in another workdir, or use the config that wrote this '
        'checkpoint.'
      )
    return meta

  def damage(self, step: int) -> str | None:
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
    if is_primary():
      os.makedirs(target_root, exist_ok=True)
      if os.path.exists(target):
        target += time.strftime('-%Y%m%d-%H%M%S')
      os.replace(self._step_dir(step), target)
    sync(f'cal_jax_set_aside_{step}')
    self._manager.reload()
    return target

  def latest_intact_step(
    self, *, set_aside: bool = False, read_errors: dict[int, str] | None = None
  ) -> int | None:
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
        + '. Restore the folder from a copy, or train again in another workdir.'
      )
    for step, problem in damaged:
      aside = f' (moved to {self._set_aside(step)})' if set_aside else ''
      logging.warning(
        'The checkpoint of step %d in %s is damaged: %s; using step %d, the newest intact one%s.',
        step,
        self.directory,
        problem,
        intact,
        aside,
      )
    return intact

  def restore(
    self, template: TrainState, step: int | None = None, *, set_aside_damaged: bool = False
  ) -> tuple[TrainState, dict[str, Any]]:
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
        except _FailedCheck as error:
          read_errors[latest] = str(error)
        except Exception as error:  # tensorstore's own
          read_errors[latest] = self._read_problem(latest, error)
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
        f'No complete checkpoint for step {step} in {self.directory}; '
        f'the committed steps are {self.all_steps()}.'
      )
    problem = self.damage(step)
    if problem is None:
      try:
        return self._restore_step(template, step)
      except IncompatibleCheckpointError:
        raise
      except _FailedCheck as error:
        problem = str(error)
      except Exception as error:
        problem = self._read_problem(step, error)
    raise DamagedCheckpointError(
      f'The checkpoint of step {step} in {self.directory} is damaged: {problem}. The '
      f'committed steps are {self.all_steps()}; choose another, or restore the step '
      'from a copy.'
    )

  def _read_problem(self, step: int, error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [''])[0][:300]
    return (
      f'{os.path.join(self._step_dir(step), "state")} cannot be read '
      f'({type(error).__name__}: {first_line})'
    )

  def _restore_step(self, template: TrainState, step: int) -> tuple[TrainState, dict[str, Any]]:
    """The state and extra of `step`. A step without its manifest is checked by the
    digest of its state saved with it (`state_digest`; `damage` checked its meta)."""
    meta = self.check_compatible(step)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
    step_dir = self._step_dir(step)
    if not checkpoint_files.has_manifest(step_dir) and (
      checkpoint_files.state_digest(restored.state) != meta.get('state_digest')
    ):
      raise _FailedCheck(
        f'{os.path.join(step_dir, "state")} does not hold what was written (the digest of '
        f'its arrays differs from the one saved with it; {checkpoint_files.MANIFEST} is missing)'
      )
    return restored.state, meta['extra']


def committed_steps(directory: str) -> list[int]:
  """The committed steps of a checkpoint folder, read only (nothing is created or removed)."""
  reader = ocp.CheckpointManager(directory, options=read_only_options())
  try:
    return sorted(reader.all_steps())
  finally:
    reader.close()


def saved_meta(directory: str, step: int) -> dict[str, Any]:
  """The `meta` item of a committed step ('fingerprint' and 'extra'), read only."""
  reader = ocp.CheckpointManager(directory, options=read_only_options())
  try:
    return reader.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  finally:
    reader.close()
