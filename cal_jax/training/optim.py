"""The optimiser of Sec. 4.1: SGD with momentum, linear warm-up, cosine decay.

The learning rate rises linearly from `warmup_start_lr` to `base_lr` over the
first `warmup_epochs`, then follows a cosine from `base_lr` to `final_lr` over
the remaining epochs; it is updated every step. Weight decay is coupled (added
to the gradient before momentum) as in `torch.optim.SGD`, and the backbone's
updates are scaled by `backbone_lr_mult` (AGW's per-group learning rates).
"""

from typing import Any

import flax
import ml_collections
import optax

# Top-level parameter collections of `CAL` that belong to the ResNet.
BACKBONE_MODULES = ('stem_visible', 'stem_infrared', 'stages')


def learning_rate_schedule(
  optim: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """Warm-up then cosine, per step: optim fields of `configs/default.py`."""
  if steps_per_epoch <= 0:
    raise ValueError(f'steps_per_epoch must be positive, got {steps_per_epoch}')
  warmup_steps = optim.warmup_epochs * steps_per_epoch
  decay_steps = max(1, (optim.num_epochs - optim.warmup_epochs) * steps_per_epoch)
  cosine = optax.cosine_decay_schedule(
    optim.base_lr, decay_steps, alpha=optim.final_lr / optim.base_lr
  )
  if warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(optim.warmup_start_lr, optim.base_lr, warmup_steps)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def parameter_groups(params: Any) -> Any:
  """'backbone' or 'head' for every leaf of the parameter tree."""
  return flax.traverse_util.path_aware_map(
    lambda path, _: 'backbone' if path[0] in BACKBONE_MODULES else 'head', params
  )


def create_optimizer(
  optim: ml_collections.ConfigDict, steps_per_epoch: int, backbone_lr_mult: float | None = None
) -> optax.GradientTransformation:
  """SGD of Sec. 4.1; the backbone's rate scaled by `backbone_lr_mult` (default: the
  config's; `state.backbone_lr_mult` gives 1 for a backbone trained from scratch)."""
  schedule = learning_rate_schedule(optim, steps_per_epoch)
  if backbone_lr_mult is None:
    backbone_lr_mult = optim.backbone_lr_mult
  return optax.chain(
    optax.add_decayed_weights(optim.weight_decay),
    optax.trace(decay=optim.momentum, nesterov=optim.nesterov),
    optax.scale_by_learning_rate(schedule),
    optax.multi_transform(
      {'backbone': optax.scale(backbone_lr_mult), 'head': optax.identity()}, parameter_groups
    ),
  )
