"""A checkpoint made ready to evaluate or draw, without a sampler or optimiser steps.

restore_trained(config, workdir, step=None) -> Trained   the data, the network, the
    state of the latest (or the given) checkpoint and its assignment counts; the
    checkpoint is looked for before the data is prepared
"""

import dataclasses
import os

import ml_collections
import numpy as np

from cal_jax.data import splits as splits_lib
from cal_jax.models.cal import CAL
from cal_jax.runtime import distributed
from cal_jax.training import checkpointing
from cal_jax.training import state as state_lib
from cal_jax.training.assignments import AssignmentCounts
from cal_jax.training.state import build_model


@dataclasses.dataclass(frozen=True)
class Trained:
  """A checkpoint made ready to evaluate or draw: no sampler, no optimiser steps."""

  splits: splits_lib.Splits
  model: CAL
  state: state_lib.TrainState
  counts: AssignmentCounts
  step: int


def restore_trained(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> Trained:
  """The data and a checkpoint's state (the latest, or `step`) and its counts; the
  checkpoint is looked for before the data is prepared."""
  directory = os.path.join(workdir, 'checkpoints')
  steps = checkpointing.committed_steps(directory) if os.path.isdir(directory) else []
  if not steps:
    raise FileNotFoundError(
      f'no checkpoint in {directory}: train first, or point --workdir at a training run'
    )
  if step is not None and step not in steps:
    raise FileNotFoundError(
      f'no checkpoint of step {step} in {directory}; --checkpoint takes one of {steps}'
    )
  splits = distributed.primary_first(lambda: splits_lib.load_splits(config, workdir), 'data')
  num_classes = len(np.unique(splits.train.id))
  with checkpointing.Checkpointer(
    os.path.join(workdir, 'checkpoints'), config, num_classes, read_only=True
  ) as checkpointer:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(
        f'no checkpoint in {checkpointer.directory}: train '
        'first, or point --workdir at a training run'
      )
    state, extra = checkpointer.restore(
      state_lib.abstract_train_state(config, num_classes), step=step
    )
  return Trained(
    splits,
    build_model(config, num_classes),
    state,
    AssignmentCounts.from_json(extra, config.model.num_parts),
    int(state.step),
  )
