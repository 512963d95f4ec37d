"""Evaluating a trained state: M-hat reordering, embedding, protocols, results file.

Shared by the end of training and by `--mode eval`.
"""

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
  if not model.shared_region_mining:
    params = inference.reorder_prototypes(params, m_hat)
  return {'params': params, 'batch_stats': state.batch_stats}, m_hat


def evaluate_state(config, splits: Splits, model: CAL, state: Any, counts: np.ndarray,
                   workdir: str, writer: Optional[Any] = None,
                   checkpoint_step: Optional[int] = None) -> dict[str, dict]:
  """Evaluates `state` on every protocol of the data set; writes DIR/eval_results.json."""
  eval_model = model.clone(axis_name=None)
  variables, m_hat = inference_variables(eval_model, state, counts)
  variables = jax.device_put(variables)

  kind = config.model.embedding

  def embed_fn(images: np.ndarray, modality: int) -> np.ndarray:
    return np.asarray(inference.embed(eval_model, variables, images, modality, kind))

  if kind == 'global':  # one "part": the evaluator normalises the whole feature
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model.num_parts = 1
  results = evaluate.evaluate(embed_fn, splits.test, splits.name, config=config,
                              num_trials=config.eval.num_trials,
                              rand_perm_path=config.eval.rand_perm_path or None,
                              distribute=distributed.split_and_gather, log=logging.info)
  step = int(state.step) if checkpoint_step is None else checkpoint_step
  meta = {'checkpoint_step': step, 'dataset': splits.name,
          'builder_config': config.data.builder_config,
          'synthetic': config.data.synthetic,
          'm_hat': m_hat.tolist(), 'embedding': kind,
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  if jax.process_index() == 0:
    results_lib.write_results(os.path.join(workdir, 'eval_results.json'), results, meta)
    print(results_lib.format_table(results), flush=True)
  if writer is not None:
    writer.write_scalars(step, {f'eval/{key}/{name}': value
                                for key, fields in results.items()
                                for name, value in fields.items()
                                if name in ('R1', 'R10', 'R20', 'mAP', 'mINP')})
  return results
