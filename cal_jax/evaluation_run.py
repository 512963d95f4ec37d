"""Evaluating a trained state: M-hat reordering, embedding, protocols, results file.

Shared by the end of training and by `--mode eval`.
"""

import dataclasses
import datetime
import os
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from cal_jax import distributed, evaluate, inference, results as results_lib
from cal_jax.data import Splits
from cal_jax.models.cal import CAL

def primary_map(results: dict[str, dict]) -> float:
  """The mAP used to pick the best checkpoint: the first protocol's."""
  return float(next(iter(results.values()))['mAP'])


def inference_variables(model: CAL, state: Any, counts: np.ndarray) -> tuple[dict, np.ndarray]:
  """Eval variables with the visible prototypes reordered by M-hat, and M-hat."""
  m_hat = inference.most_frequent_assignment(counts, model.num_parts)
  params = state.params
  if model.part_queries == 'horizontal':  # Table 4's HS: stripe k is the same rows in both
    m_hat = np.arange(model.num_parts, dtype=np.int32)
  elif not model.shared_region_mining:
    params = inference.reorder_prototypes(params, m_hat)
  return {'params': params, 'batch_stats': state.batch_stats}, m_hat


@dataclasses.dataclass(frozen=True)
class Embedder:
  """A state made ready for evaluation: what the evaluator and the pictures use.

  Attributes:
    config: the run's config; for the baseline's global embedding a copy with
      num_parts = 1 (one "part": the evaluator normalises the whole feature).
    model: the network without a pmap axis.
    variables: eval variables, visible prototypes reordered by M-hat.
    m_hat: M-hat, [N_p].
  """
  config: Any
  model: CAL
  variables: Any
  m_hat: np.ndarray

  def __call__(self, images: np.ndarray, modality: int) -> np.ndarray:
    """`evaluate.EmbedFn`: images [B, H, W, 3] -> embeddings [B, D]."""
    return np.asarray(inference.embed(self.model, self.variables, images, modality,
                                      self.config.model.embedding))


def make_embedder(config, model: CAL, state: Any, counts: np.ndarray) -> Embedder:
  """The `Embedder` of a (restored or trained) state and its assignment counts."""
  eval_model = model.clone(axis_name=None)
  variables, m_hat = inference_variables(eval_model, state, counts)
  if config.model.embedding == 'global':
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model.num_parts = 1
  return Embedder(config, eval_model, jax.device_put(variables), m_hat)


def evaluate_state(config, splits: Splits, model: CAL, state: Any, counts: np.ndarray,
                   workdir: str, writer: Optional[Any] = None,
                   checkpoint_step: Optional[int] = None) -> dict[str, dict]:
  """Evaluates `state` on every protocol of the data set; writes DIR/eval_results.json.

  With a `writer` (periodic evaluation during training), also the metrics,
  the table and, with config.eval.pictures, the pictures of `cal_jax.pictures`.
  """
  embedder = make_embedder(config, model, state, counts)
  results = evaluate.evaluate(embedder, splits.test, splits.name, config=embedder.config,
                              num_trials=config.eval.num_trials,
                              rand_perm_path=config.eval.rand_perm_path or None,
                              distribute=distributed.split_and_gather, log=logging.info)
  step = int(state.step) if checkpoint_step is None else checkpoint_step
  meta = {'checkpoint_step': step, 'dataset': splits.name,
          'builder_config': config.data.builder_config,
          'synthetic': config.data.synthetic,
          'm_hat': embedder.m_hat.tolist(), 'embedding': config.model.embedding,
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  table = results_lib.format_table(results)
  if jax.process_index() == 0:
    results_lib.write_results(os.path.join(workdir, 'eval_results.json'), results, meta)
    print(table, flush=True)
  if writer is not None:
    writer.write_scalars(step, {f'eval/{key}/{name}': value
                                for key, fields in results.items()
                                for name, value in fields.items()
                                if name in ('R1', 'R10', 'R20', 'mAP', 'mINP')})
    # Indented: a Markdown code block, so TensorBoard keeps the columns.
    writer.write_texts(step, {'eval/table': '\n'.join('    ' + line for line in table.splitlines())})
    if config.eval.get('pictures', False) and jax.process_index() == 0:
      from cal_jax import pictures  # pylint: disable=g-import-not-at-top  (matplotlib)
      try:
        writer.write_images(step, pictures.evaluation_images(embedder, splits, results))
      except ValueError as error:  # e.g. a test split too small to draw; not worth the run
        logging.warning('No pictures at step %d: %s', step, error)
  return results
