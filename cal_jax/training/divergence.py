"""A run that diverged stops in one line, before anything non-finite is saved.

check_finite(step, summary)            a loss term NaN or infinite
check_finite_state(step, state, config)   parameters or statistics no longer finite after
                                       an update whose loss was finite (a huge gradient)
divergence_advice(config)              what to change: Eq. 14's sums first, when they are on
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cal_jax.losses import LOSS_TERMS

LOSSES = ('loss',) + LOSS_TERMS  # the weighted total and every term


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN or infinite; training stops, checkpoints stay."""


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
