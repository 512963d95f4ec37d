"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

The workdir holds the resolved config, Orbax checkpoints, TensorBoard
summaries and `eval_results.json`. Running again on the same workdir resumes
from the latest checkpoint: the train state, the data-pipeline position (the
step: batches and augmentations are functions of (seed, step)) and the
assignment counts of the current and the last epoch, so a resumed run ends
exactly where an uninterrupted one does.
"""

import contextlib
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from cal_jax import (checkpointing, config_checks, data, distributed, evaluation_run,
                     input_pipeline, parallel, stopping, train_state)
from cal_jax import sampler as sampler_lib
from cal_jax import workdir as workdir_lib
from cal_jax.models.cal import create_model
from cal_jax.optim import learning_rate_schedule
from cal_jax.train_step import make_p_train_step

LOSS_TERMS = ('loss', 'id', 'global_id', 'pcl', 'kd1', 'kd2', 'dis', 'div', 'attention_div')
ATTENTION_STATISTICS = ('attention_max', 'attention_entropy', 'attention_distinct')


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN or infinite; training stops, checkpoints stay."""


class TrainingSetup:
  """Everything built from the config and the data before the first step."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.splits = distributed.primary_first(lambda: data.load_splits(config, workdir), 'data')
    self.sampler = sampler_lib.CrossModalIdentitySampler.from_config(
        config, self.splits.train.id, self.splits.train.modality,
        local_devices=jax.local_device_count(), num_hosts=jax.process_count(),
        host_index=jax.process_index())
    self.num_classes = self.sampler.num_classes
    self.steps_per_epoch = self.sampler.steps_per_epoch
    self.total_steps = config.optim.num_epochs * self.steps_per_epoch
    self.model = create_model(config, self.num_classes, axis_name=parallel.AXIS)
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, 'checkpoints'), config, self.num_classes,
        keep=config.keep_checkpoints)


def initial_state(setup: TrainingSetup, *, load_pretrained: bool = True
                  ) -> train_state.TrainState:
  """A fresh state; with `load_pretrained`, the backbone from config.model.pretrained.

  A state that only serves as the template of a restore does not read the
  ImageNet file (the checkpoint holds the weights): it may be gone by then.
  """
  config = setup.config
  state = train_state.create_train_state(setup.model, config, jax.random.key(config.seed),
                                         setup.steps_per_epoch)
  if config.model.pretrained and load_pretrained:
    from cal_jax import pretrained  # pylint: disable=g-import-not-at-top
    backbone = pretrained.load_torchvision_resnet(config.model.pretrained,
                                                  f'resnet{config.model.depth}',
                                                  width=config.model.width)
    variables = pretrained.apply_to_cal(
        {'params': state.params, 'batch_stats': state.batch_stats}, backbone,
        modality_specific_stem=config.model.modality_specific_stem)
    state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'],
                          opt_state=state.tx.init(variables['params']))
  return state


def restore_or_initialize(setup: TrainingSetup) -> tuple[train_state.TrainState, dict]:
  """The latest intact checkpoint of the workdir, else a fresh state.

  Damaged newer steps are named in a warning and moved aside
  (`Checkpointer.latest_intact_step`). A resumed run must have the config that
  trained it, but for the fields of `workdir.RESUMABLE_CHANGES`.
  """
  latest = setup.checkpointer.latest_intact_step(set_aside=True)
  if latest is not None:
    setup.checkpointer.check_compatible(latest)  # before anything is compiled
    workdir_lib.check_config_unchanged(setup.workdir, setup.config)
  template = initial_state(setup, load_pretrained=latest is None)
  if latest is None:
    counts = np.zeros(np.prod(np.arange(1, setup.config.model.num_parts + 1)), np.int64)
    return template, {'epoch_counts': counts.tolist(), 'last_epoch_counts': counts.tolist()}
  state, extra = setup.checkpointer.restore(template, set_aside_damaged=True)
  logging.info('Resumed from step %d.', int(state.step))
  return state, extra


def check_finite(step: int, summary: dict[str, float]) -> None:
  bad = [term for term in LOSS_TERMS if not np.isfinite(summary[term])]
  if bad:
    raise NonFiniteLossError(
        f'non-finite loss at step {step}: {", ".join(f"{t}={summary[t]}" for t in bad)}. '
        'Training stopped; the last good checkpoint is kept. Lower config.optim.base_lr or '
        'check the input data.')


def summarize(history: list[dict[str, Any]]) -> dict[str, float]:
  """Mean of each scalar metric over the steps since the last summary."""
  host = jax.device_get(history)
  scalars = LOSS_TERMS + ATTENTION_STATISTICS + ('grad_norm',)
  return {k: float(np.mean([h[k][0] for h in host])) for k in scalars} | {
      'bad_pairs': float(np.sum([h['bad_pairs'][0] for h in host]))}


def has_checkpoints(workdir: str) -> bool:
  """Whether the workdir holds a committed checkpoint step (a folder named by its step)."""
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _chief_lock(workdir: str):
  """One run per workdir: process 0 holds `workdir.locked` (the others share its run)."""
  return workdir_lib.locked(workdir) if jax.process_index() == 0 else contextlib.nullcontext()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Optional[dict]:
  """Trains CAL, then evaluates the final model; returns the evaluation results.

  Raises `stopping.Stopped` after saving the current step when SIGTERM or
  SIGINT arrives.
  """
  # Every field in its range, before anything is read; a resumed run has its
  # ImageNet weights in the checkpoint already.
  config_checks.check_config(config, resuming=has_checkpoints(workdir))
  workdir_lib.check_writable(workdir)
  with _chief_lock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Optional[dict]:
  is_chief = jax.process_index() == 0
  setup = TrainingSetup(config, workdir)
  state, extra = restore_or_initialize(setup)  # refuses an incompatible checkpoint
  workdir_lib.check_free_space(workdir, workdir_lib.run_bytes(state, config.keep_checkpoints))
  if is_chief:
    workdir_lib.write_text_atomically(os.path.join(workdir, 'config.json'),
                                      config.to_json_best_effort(indent=2))
  first_step = int(state.step)
  epoch_counts = np.asarray(extra['epoch_counts'], np.int64)
  last_epoch_counts = np.asarray(extra['last_epoch_counts'], np.int64)
  logging.info('%d training identities, %d steps per epoch, %d steps; %d parameters.',
               setup.num_classes, setup.steps_per_epoch, setup.total_steps,
               train_state.count_parameters(state.params))
  logging.info('Step %d: %s.', first_step + 1,
               distributed.host_share_summary(setup.sampler.batch_indices(first_step).label))

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  report = periodic_actions.ReportProgress(num_train_steps=setup.total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  hooks = [report]
  if is_chief and config.profile:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))

  schedule = learning_rate_schedule(config.optim, setup.steps_per_epoch)
  p_step = make_p_train_step(config)
  rstate = parallel.replicate(state)
  key = parallel.replicate(jax.random.key_data(jax.random.key(config.seed)))
  batches = input_pipeline.create_train_iterator(
      setup.splits.train, setup.sampler, input_pipeline.TrainTransform.from_config(config.data),
      seed=config.seed, start_step=first_step, num_steps=setup.total_steps - first_step,
      prefetch=config.data.prefetch)
  images_per_step = setup.sampler.num_shards * setup.sampler.per_device_batch
  history, device_counts = [], jnp.zeros_like(epoch_counts)
  last_log = time.time()

  if first_step >= setup.total_steps and config.eval.enabled:
    logging.info('Training already finished at step %d; evaluating it again.', first_step)
    counts = last_epoch_counts if last_epoch_counts.sum() else epoch_counts
    try:
      results = evaluation_run.evaluate_state(config, setup.splits, setup.model, state, counts,
                                              workdir)
      if not setup.checkpointer.has_metrics(first_step):  # its first evaluation had failed
        setup.checkpointer.record_metrics(first_step,
                                          {'mAP': evaluation_run.primary_map(results)})
    finally:
      setup.checkpointer.close()
    return results
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
      stop_now = stop.signum is not None  # then the next run evaluates, if due
      evaluate_now = config.eval.enabled and not stop_now and (
          last or (config.eval_every_steps and step % config.eval_every_steps == 0))
      save_now = last or evaluate_now or stop_now or step % config.checkpoint_every_steps == 0
      if step % config.log_every_steps == 0 or save_now or end_of_epoch:
        summary = summarize(history)
        check_finite(step, summary)
        if summary['bad_pairs']:
          raise ValueError(f'step {step}: {int(summary["bad_pairs"])} images had no image of the '
                           'same identity in the other modality on their device; the sampler '
                           'must keep identities whole per device')
        now = time.time()
        summary['learning_rate'] = float(schedule(step - 1))
        summary['images_per_second'] = len(history) * images_per_step / (now - last_log)
        writer.write_scalars(step, summary)
        history, last_log = [], now
        epoch_counts = epoch_counts + np.asarray(device_counts, np.int64)
        device_counts = jnp.zeros_like(device_counts)
      if end_of_epoch:
        last_epoch_counts, epoch_counts = epoch_counts, np.zeros_like(epoch_counts)
      if save_now:
        # Saved before it is evaluated: a failing evaluation loses no training.
        host_state = parallel.unreplicate(rstate)
        setup.checkpointer.save(step, host_state, {
            'epoch_counts': epoch_counts.tolist(),
            'last_epoch_counts': last_epoch_counts.tolist()})
        if evaluate_now:
          with report.timed('eval'):
            counts = last_epoch_counts if last_epoch_counts.sum() else epoch_counts
            results = evaluation_run.evaluate_state(config, setup.splits, setup.model, host_state,
                                                    counts, workdir, writer=writer)
          setup.checkpointer.record_metrics(step, {'mAP': evaluation_run.primary_map(results)})
        if stop_now:
          raise stopping.Stopped(stop.signum, step, setup.checkpointer.directory)
  finally:
    stop.uninstall()
    # Also on an error: a checkpoint still being written is committed, not lost.
    setup.checkpointer.close()
  writer.flush()
  return results


def restore_for_evaluation(setup: TrainingSetup, step: Optional[int] = None
                           ) -> tuple[train_state.TrainState, np.ndarray]:
  """A checkpoint's state (the latest, or `step`) and the counts M-hat comes from."""
  if setup.checkpointer.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {setup.checkpointer.directory}: train '
                            'first, or point --workdir at a training run')
  state, extra = setup.checkpointer.restore(initial_state(setup, load_pretrained=False),
                                            step=step)
  last, current = (np.asarray(extra[k], np.int64) for k in ('last_epoch_counts', 'epoch_counts'))
  return state, last if last.sum() else current


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: Optional[int] = None) -> dict:
  """`--mode eval`: evaluates the latest (or the given) checkpoint of a workdir."""
  config_checks.check_config(config, resuming=True)
  workdir_lib.check_writable(workdir)
  with _chief_lock(workdir):
    return _evaluate_checkpoint(config, workdir, step)


def _evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                         step: Optional[int] = None) -> dict:
  setup = TrainingSetup(config, workdir)
  state, counts = restore_for_evaluation(setup, step)
  results = evaluation_run.evaluate_state(config, setup.splits, setup.model, state, counts,
                                          workdir)
  setup.checkpointer.close()
  return results
