"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

The workdir holds the resolved config, Orbax checkpoints, TensorBoard
summaries and `eval_results.json`. Running again on the same workdir resumes
from the latest checkpoint: the train state, the data-pipeline position (the
step: batches and augmentations are functions of (seed, step)) and the
assignment counts of the current and the last epoch, so a resumed run ends
exactly where an uninterrupted one does.
"""

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from cal_jax.config import checks as config_checks
from cal_jax.config import formulations
from cal_jax.data import splits as splits_lib
from cal_jax.data import train_stream
from cal_jax.data.augment import TrainTransform
from cal_jax.data.datasets import specs
from cal_jax.data.sampler import CrossModalIdentitySampler
from cal_jax.evaluation import run
from cal_jax.evaluation.evaluator import EvalSettings, NonFiniteFeaturesError
from cal_jax.losses import LOSS_TERMS
from cal_jax.models.cal import CAL
from cal_jax.runtime import distributed, stopping, terminal
from cal_jax.runtime import workdir as workdir_lib
from cal_jax.training import checkpointing
from cal_jax.training import state as state_lib
from cal_jax.training.assignments import AssignmentCounts
from cal_jax.training.collapse import CollapseGuard
from cal_jax.training.optim import learning_rate_schedule
from cal_jax.training.state import build_model
from cal_jax.training.step import SCALARS, make_p_train_step

LOSSES = ('loss',) + LOSS_TERMS  # the weighted total and every term

# (config) -> the pmapped step, `(rstate, batch, key) -> (rstate, metrics)`.
MakeStep = Callable[[ml_collections.ConfigDict], Callable[..., Any]]


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN or infinite; training stops, checkpoints stay."""


class TrainingSetup:
  """Everything built from the config and the data before the first step."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.splits = distributed.primary_first(lambda: splits_lib.load_splits(config, workdir), 'data')
    self.sampler = CrossModalIdentitySampler.from_config(
      config,
      self.splits.train.id,
      self.splits.train.modality,
      local_devices=jax.local_device_count(),
      num_hosts=jax.process_count(),
      host_index=jax.process_index(),
    )
    self.num_classes = self.sampler.num_classes
    self.steps_per_epoch = self.sampler.steps_per_epoch
    self.total_steps = config.optim.num_epochs * self.steps_per_epoch
    self.model = build_model(config, self.num_classes, axis_name=distributed.AXIS)
    self.checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), config, self.num_classes, keep=config.keep_checkpoints
    )
    self.evaluator = Evaluator(config, workdir, self.splits, self.model)


class Evaluator:
  """Evaluates states of one run; the loop's periodic evaluations also draw the pictures
  (config.eval.pictures). The evaluator itself reads only its `EvalSettings`."""

  def __init__(
    self, config: ml_collections.ConfigDict, workdir: str, splits: splits_lib.Splits, model: CAL
  ):
    self.settings = EvalSettings.from_config(config)
    self.config = config
    self.pictures = bool(config.eval.pictures)
    self.meta = {'synthetic': config.data.synthetic}  # recorded in eval_results.json
    self.workdir, self.splits, self.model = workdir, splits, model

  def __call__(
    self, state: Any, counts: AssignmentCounts, step: int, writer: Any | None = None
  ) -> dict[str, dict]:
    """The results of `state`; with a `writer` (training), also to TensorBoard."""
    settings = self.settings
    terminal.say('Evaluating step %d on the test protocols of %s.', step, self.splits.name)
    embedder = run.make_embedder(self.model, state, counts.m_hat(), settings.embedding)
    try:
      evaluation = run.evaluate_state(
        embedder, self.splits, settings, self.workdir, step=step, meta=self.meta, writer=writer
      )
    except NonFiniteFeaturesError as error:
      raise NonFiniteLossError(
        f'step {step}: {error}. {divergence_advice(self.config)}.'
      ) from error
    if writer is not None and self.pictures and jax.process_index() == 0:
      from cal_jax.pictures import figures  # matplotlib, only when drawing

      try:
        writer.write_images(
          step,
          figures.evaluation_images(
            embedder, evaluation, self.splits.test, self.splits.name, settings.image_size
          ),
        )
      except ValueError as error:  # e.g. a test split too small to draw; not worth the run
        logging.warning('No pictures at step %d: %s', step, error)
    return evaluation.results


def restore_or_initialize(setup: TrainingSetup) -> tuple[state_lib.TrainState, AssignmentCounts]:
  """The latest intact checkpoint of the workdir, else a fresh state.

  Damaged newer steps are named in a warning and moved aside
  (`Checkpointer.latest_intact_step`). A resumed run must have the config that
  trained it, but for the fields of `workdir.RESUMABLE_CHANGES`.
  """
  latest = setup.checkpointer.latest_intact_step(set_aside=True)
  if latest is not None:
    setup.checkpointer.check_compatible(latest)  # before anything is compiled
    workdir_lib.check_config_unchanged(setup.workdir, setup.config)
  template = state_lib.initial_state(
    setup.model, setup.config, setup.steps_per_epoch, load_pretrained=latest is None
  )
  num_parts = setup.config.model.num_parts
  if latest is None:
    say_backbone_start(setup.config)
    return template, AssignmentCounts.zeros(num_parts)
  state, extra = setup.checkpointer.restore(template, set_aside_damaged=True)
  terminal.say('Resumed from step %d.', int(state.step))
  return state, AssignmentCounts.from_json(extra, num_parts)


def say_backbone_start(config: ml_collections.ConfigDict) -> None:
  """Where a fresh run's backbone starts, on the terminal and in the log."""
  if state_lib.pretrained_file(config):
    terminal.say(
      'Backbone: ResNet-%d loaded from %s (its %gx learning rate: config.optim.backbone_lr_mult).',
      config.model.depth,
      config.model.pretrained,
      config.optim.backbone_lr_mult,
    )
  elif config.model.pretrained == state_lib.PRETRAINED_NONE:
    terminal.say(
      'Backbone: from scratch (config.model.pretrained=none); it trains at the full learning '
      'rate, config.optim.backbone_lr_mult=%g does not apply.',
      config.optim.backbone_lr_mult,
    )
  else:
    logging.info('Backbone: from scratch (no config.model.pretrained; synthetic data).')


def check_finite(step: int, summary: dict[str, float]) -> None:
  bad = [term for term in LOSSES if not np.isfinite(summary[term])]
  if bad:
    raise NonFiniteLossError(
      f'non-finite loss at step {step}: {", ".join(f"{t}={summary[t]}" for t in bad)}. '
      'Training stopped; the last good checkpoint is kept. Lower config.optim.base_lr or '
      'check the input data.'
    )


def divergence_advice(config: ml_collections.ConfigDict) -> str:
  """What to change when training diverged: Eq. 14's sums first, when they are on."""
  advice = 'lower config.optim.base_lr'
  loss = config.loss
  if loss.pcl_form != 'pcl' or not loss.pcl or loss.pcl_reduction != 'sum':
    return advice
  if loss.pcl_features == 'raw':
    return (
      "config.loss.pcl_features='raw' (Eq. 15 on the TSAA outputs as they are) gives Eq. 14's "
      'sums gradients that grow with the features: --config.loss.pcl_features=unit_parts '
      '(docs/decisions/model_and_losses.md, "The scale of Eq. 15"); or ' + advice
    )
  return (
    "config.loss.pcl_reduction='sum' (Eq. 14 as written) has the largest gradients of the "
    'objective: --config.loss.pcl_reduction=normalised_mean is the measured variant '
    '(docs/decisions/model_and_losses.md, "PCL scale"); or ' + advice
  )


def check_finite_state(step: int, state: Any, config: ml_collections.ConfigDict) -> None:
  """A checkpoint never holds a diverged state: the update of a step whose loss was
  finite can still make parameters or statistics non-finite (a huge gradient)."""
  leaves = jax.tree_util.tree_leaves((state.params, state.batch_stats))
  if all(bool(jnp.all(jnp.isfinite(x))) for x in leaves):
    return
  raise NonFiniteLossError(
    f'the parameters became non-finite in the update of step {step} (its loss was finite). '
    f'Training stopped; the last good checkpoint is kept. {divergence_advice(config)}.'
  )


def summarize(history: list[dict[str, Any]]) -> dict[str, float]:
  """Mean of each scalar metric over the steps since the last summary."""
  host = jax.device_get(history)
  return {k: float(np.mean([h[k][0] for h in host])) for k in SCALARS} | {
    'bad_pairs': float(np.sum([h['bad_pairs'][0] for h in host]))
  }


def has_checkpoints(workdir: str) -> bool:
  """Whether the workdir holds a committed checkpoint step (a folder named by its step)."""
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _chief_lock(workdir: str):
  """One run per workdir: process 0 holds `workdir.locked` (the others share its run)."""
  return workdir_lib.locked(workdir) if jax.process_index() == 0 else contextlib.nullcontext()


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, make_step: MakeStep = make_p_train_step
) -> dict | None:
  """Trains CAL, then evaluates the final model; returns the evaluation results.

  `make_step(config)` builds the pmapped train step (tests pass a fake one).
  Raises `stopping.Stopped` after saving the current step when SIGTERM or
  SIGINT arrives.
  """
  # Every field in its range, before anything is read; a resumed run has its
  # ImageNet weights in the checkpoint already.
  config_checks.check_config(config, resuming=has_checkpoints(workdir))
  workdir_lib.check_writable(workdir)
  with _chief_lock(workdir):
    setup = TrainingSetup(config, workdir)
    state, counts = restore_or_initialize(setup)  # refuses an incompatible checkpoint
    workdir_lib.check_free_space(workdir, workdir_lib.run_bytes(state, config.keep_checkpoints))
    if jax.process_index() == 0:
      workdir_lib.write_text_atomically(
        os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2)
      )
    # Only now, as the run is accepted: a refused run leaves the workdir as it was.
    terminal.attach_log_file(workdir, jax.process_index())
    if int(state.step) >= setup.total_steps and config.eval.enabled:
      return _evaluate_again(setup, state, counts)
    return _train(setup, state, counts, make_step)


def _evaluate_again(setup: TrainingSetup, state: Any, counts: AssignmentCounts) -> dict:
  """A finished run, started again: its last checkpoint is evaluated once more."""
  step = int(state.step)
  terminal.say('Training already finished at step %d; evaluating it again.', step)
  try:
    results = setup.evaluator(state, counts, step)
    if not setup.checkpointer.has_metrics(step):  # its first evaluation had failed
      setup.checkpointer.record_metrics(step, {'mAP': run.primary_map(results)})
  finally:
    setup.checkpointer.close()
  return results


def _train(
  setup: TrainingSetup, state: Any, counts: AssignmentCounts, make_step: MakeStep
) -> dict | None:
  config = setup.config
  is_chief = jax.process_index() == 0
  first_step = int(state.step)
  terminal.say(
    '%d training identities, %d steps per epoch, %d steps; %d parameters.',
    setup.num_classes,
    setup.steps_per_epoch,
    setup.total_steps,
    state_lib.count_parameters(state.params),
  )
  terminal.say('%s', formulations.describe(config))
  logging.info(
    'Step %d: %s.',
    first_step + 1,
    distributed.host_share_summary(setup.sampler.batch_indices(first_step).label),
  )

  writer = metric_writers.create_default_writer(setup.workdir, just_logging=not is_chief)
  report = periodic_actions.ReportProgress(
    num_train_steps=setup.total_steps, writer=writer, every_steps=config.log_every_steps
  )
  hooks = [report]
  if is_chief and config.profile:
    hooks.append(periodic_actions.Profile(logdir=setup.workdir, num_profile_steps=5))

  schedule = learning_rate_schedule(config.optim, setup.steps_per_epoch)
  p_step = make_step(config)
  rstate = distributed.replicate(state)
  key = distributed.replicate(jax.random.key_data(jax.random.key(config.seed)))
  batches = train_stream.create_train_iterator(
    setup.splits.train,
    setup.sampler,
    TrainTransform.from_config(config.data),
    seed=config.seed,
    start_step=first_step,
    num_steps=setup.total_steps - first_step,
    prefetch=config.data.prefetch,
    camera_class=(
      specs.camera_class_index(
        setup.splits.name, setup.splits.train.modality, setup.splits.train.camera
      )
      if config.loss.pcl_form == 'ica_cca'
      else None
    ),
  )
  images_per_step = setup.sampler.num_shards * setup.sampler.per_device_batch
  history, device_counts = [], jnp.zeros_like(counts.current)
  last_log = started = time.time()
  collapse = CollapseGuard(config.loss)

  results = None
  stop = stopping.StopSignals().install()
  try:
    for step in range(first_step + 1, setup.total_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        rstate, metrics = p_step(rstate, next(batches), key)
      history.append(metrics)
      device_counts = device_counts + metrics['assignment_counts'][0]
      for hook in hooks:
        hook(step)
      end_of_epoch = step % setup.steps_per_epoch == 0
      last = step == setup.total_steps
      stop_now = stop.requested()  # then the next run evaluates, if due
      evaluate_now = (
        config.eval.enabled
        and not stop_now
        and (last or (config.eval_every_steps and step % config.eval_every_steps == 0))
      )
      save_now = last or evaluate_now or stop_now or step % config.checkpoint_every_steps == 0
      if step % config.log_every_steps == 0 or save_now or end_of_epoch:
        summary = summarize(history)
        check_finite(step, summary)
        if summary['bad_pairs']:
          raise ValueError(
            f'step {step}: {int(summary["bad_pairs"])} images had no image of the '
            'same identity in the other modality on their device; the sampler '
            'must keep identities whole per device'
          )
        now = time.time()
        summary['learning_rate'] = float(schedule(step - 1))
        summary['images_per_second'] = len(history) * images_per_step / (now - last_log)
        writer.write_scalars(step, summary)
        terminal.say(
          progress_line(step, setup.total_steps, summary, now - started, step - first_step)
        )
        warning = collapse.update(step, summary)
        if warning and is_chief:
          logging.warning('%s', warning)
        history, last_log = [], now
        counts.add(device_counts)
        device_counts = jnp.zeros_like(device_counts)
      if end_of_epoch:
        counts.end_epoch()
      if save_now:
        # Saved before it is evaluated: a failing evaluation loses no training.
        host_state = distributed.unreplicate(rstate)
        check_finite_state(step, host_state, config)
        setup.checkpointer.save(step, host_state, counts.to_json())
        terminal.say('Checkpoint of step %d: %s', step, setup.checkpointer.directory)
        if evaluate_now:
          with report.timed('eval'):
            results = setup.evaluator(host_state, counts, step, writer=writer)
          setup.checkpointer.record_metrics(step, {'mAP': run.primary_map(results)})
        if stop_now:
          raise stopping.Stopped(stop.signum, step, setup.checkpointer.directory)
  finally:
    stop.uninstall()
    # Also on an error: a checkpoint still being written is committed, not lost.
    setup.checkpointer.close()
  writer.flush()
  return results


def progress_line(step: int, total: int, summary: dict, elapsed: float, done: int) -> str:
  """'step 94/940 (10%)  loss 5.213  412 images/s  ETA 6m05s': the terminal's line per
  log interval; the ETA from the mean rate of this run's steps so far."""
  eta = elapsed / max(done, 1) * (total - step)
  return (
    f'step {step}/{total} ({100 * step // max(total, 1)}%)  loss {float(summary["loss"]):.3f}  '
    f'{terminal.format_rate(summary["images_per_second"])} images/s  '
    f'ETA {terminal.format_duration(eta)}'
  )


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


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict:
  """`--mode eval`: evaluates the latest (or the given) checkpoint of a workdir."""
  config_checks.check_config(config, resuming=True)
  workdir_lib.check_writable(workdir)
  with _chief_lock(workdir):
    trained = restore_trained(config, workdir, step)
    terminal.attach_log_file(workdir, jax.process_index())
    terminal.say('Evaluating the checkpoint of step %d.', trained.step)
    evaluator = Evaluator(config, workdir, trained.splits, trained.model)
    return evaluator(trained.state, trained.counts, trained.step)
