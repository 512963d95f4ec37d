"""Evaluating a trained state: M-hat reordering, embedding, protocols, results file.

Shared by the end of training, the periodic evaluations and `--mode eval`
(`cal_jax.training.loop`); the loop decides what else to do with the
`Evaluation` (the pictures of `cal_jax.pictures`).
"""

import dataclasses
import datetime
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from cal_jax.data.splits import Splits
from cal_jax.evaluation import embedding, evaluator, feature_cache
from cal_jax.evaluation import results as results_lib
from cal_jax.models.cal import CAL
from cal_jax.runtime import distributed, terminal

TENSORBOARD_METRICS = ('R1', 'R10', 'R20', 'mAP', 'mINP')


def primary_map(results: dict[str, dict]) -> float:
  """The mAP used to pick the best checkpoint: the first protocol's."""
  return float(next(iter(results.values()))['mAP'])


def inference_variables(model: CAL, state: Any, m_hat: np.ndarray) -> tuple[dict, np.ndarray]:
  """Eval variables with the visible prototypes reordered by M-hat, and M-hat."""
  params = state.params
  if model.part_queries == 'horizontal':  # Table 4's HS: stripe k is the same rows in both
    m_hat = np.arange(model.num_parts, dtype=np.int32)
  elif not model.shared_region_mining:
    params = embedding.reorder_prototypes(params, m_hat)
  return {'params': params, 'batch_stats': state.batch_stats}, m_hat


@dataclasses.dataclass(frozen=True)
class Embedder:
  """A state made ready for evaluation: what the evaluator and the pictures use.

  Attributes:
    model: the network without a pmap axis.
    variables: eval variables, visible prototypes reordered by M-hat.
    m_hat: M-hat, [N_p].
    kind: 'parts' (CAL) or 'global' (the baseline), `embedding.embed`'s kind.
    replicated: the variables on every local device, for images [L, B / L, ...].
  """

  model: CAL
  variables: Any
  m_hat: np.ndarray
  kind: str = 'parts'
  replicated: Any = None

  @property
  def local_devices(self) -> int | None:
    """L when images may come as [L, B / L, H, W, 3] (`extract_features`), else None."""
    return jax.local_device_count() if self.replicated is not None else None

  def __call__(self, images: np.ndarray, modality: int) -> jax.Array:
    """`embedding.EmbedFn`: images [B, H, W, 3] -> embeddings [B, D] on the first device;
    images [L, B / L, H, W, 3] -> [L, B / L, D], one slice per local device. Returns
    before the result is ready (JAX's asynchronous dispatch)."""
    if np.ndim(images) == 5:
      if self.replicated is None:
        raise ValueError('this Embedder was made for one device (make_embedder(devices=False))')
      return embedding.p_embed(self.model, self.replicated, images, modality, self.kind)
    return embedding.embed(self.model, self.variables, images, modality, self.kind)


def make_embedder(
  model: CAL, state: Any, m_hat: np.ndarray, kind: str = 'parts', devices: bool = True
) -> Embedder:
  """The `Embedder` of a (restored or trained) state and its M-hat; with `devices`
  and more than one local device, also replicated for data-parallel evaluation."""
  eval_model = model.clone(axis_name=None)
  variables, m_hat = inference_variables(eval_model, state, m_hat)
  replicated = None
  if devices and jax.local_device_count() > 1:
    replicated = distributed.replicate(variables)
  return Embedder(eval_model, jax.device_put(variables), m_hat, kind, replicated)


def evaluate_state(
  embedder: Embedder,
  splits: Splits,
  settings: evaluator.EvalSettings,
  workdir: str,
  *,
  step: int,
  meta: dict[str, Any] | None = None,
  writer: Any | None = None,
) -> evaluator.Evaluation:
  """Evaluates on every protocol of the data set; writes DIR/eval_results.json (or,
  for a step older than the one it holds, DIR/eval_results_step<N>.json: `results_path`).

  Args:
    embedder: the state to evaluate (`make_embedder`).
    splits: the data set; its test split is evaluated.
    settings: `evaluator.EvalSettings.from_config(config)`.
    workdir: where eval_results.json is written (by process 0).
    step: the checkpoint step, recorded in the results.
    meta: more entries for the results' 'meta' (e.g. config.data.synthetic).
    writer: a `clu` metric writer (training): the metrics and the table go there too.
  """
  local_devices = embedder.local_devices
  if local_devices and settings.batch_size % local_devices:
    logging.warning(
      'config.data.eval_batch_size=%d is not divisible by the %d local devices: '
      'evaluating on one device',
      settings.batch_size,
      local_devices,
    )
    local_devices = None
  cache = None
  # One process: with several, each would decide alone whether to embed, and the
  # collective gathering of `split_and_gather` needs them all to.
  if settings.cache_features and jax.process_count() == 1:
    key = feature_cache.cache_key(
      embedder.model,
      embedder.variables,
      embedder.m_hat,
      embedder.kind,
      settings,
      step,
      splits.test,
    )
    cache = feature_cache.FeatureCache(workdir, key)
  evaluation = evaluator.evaluate(
    embedder,
    splits.test,
    splits.name,
    settings,
    local_devices=local_devices,
    distribute=distributed.split_and_gather,
    log=logging.info,
    cache=cache,
    say=terminal.say,
  )
  results = evaluation.results
  meta = {
    'checkpoint_step': step,
    'dataset': splits.name,
    'builder_config': settings.builder_config,
    **(meta or {}),
    'm_hat': embedder.m_hat.tolist(),
    'embedding': settings.embedding,
    'rerank': settings.rerank.describe() if settings.rerank else 'none',
    'devices': local_devices or 1,
    'cached_features': cache.hits if cache is not None else 0,
    'timing': {k: round(v, 3) for k, v in evaluation.timing.items()},
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
  }
  table = results_lib.format_table(results)
  if jax.process_index() == 0:
    path = results_lib.results_path(workdir, step)
    if os.path.basename(path) != results_lib.RESULTS_FILE:
      logging.warning(
        'Step %d is older than the step of %s: its results go to %s.',
        step,
        os.path.join(workdir, results_lib.RESULTS_FILE),
        path,
      )
    results_lib.write_results(path, results, meta)
    print(table, flush=True)
  if writer is not None:
    writer.write_scalars(
      step,
      {
        f'eval/{key}/{name}': value
        for key, fields in results.items()
        for name, value in fields.items()
        if name in TENSORBOARD_METRICS
      },
    )
    # Indented: a Markdown code block, so TensorBoard keeps the columns.
    writer.write_texts(
      step, {'eval/table': '\n'.join('    ' + line for line in table.splitlines())}
    )
  return evaluation
