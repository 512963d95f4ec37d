"""The train state: parameters, batch-norm statistics, optimiser state, step."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
from flax.training import train_state

from cal_jax import optim
from cal_jax.models.cal import CAL


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def initial_variables(model: CAL, rng: jax.Array, image_shape: tuple[int, int]
                      ) -> flax.core.FrozenDict:
  """Initialise the CAL network on a dummy batch of two images per modality."""
  images = jnp.zeros((2, *image_shape, 3), jnp.float32)
  partners = jnp.zeros((2,), jnp.int32)
  return model.init(rng, images, images, partners, partners, train=False)


def start_stems_equal(variables: Any) -> dict:
  """Both modality-specific stems start from the same weights: the visible stem's.

  With ImageNet weights both stems are loaded from the same `conv1`/`bn1`
  (`pretrained.apply_to_cal`); from scratch this does the same with the random
  initialisation, so the shared stages first see both modalities through one
  filter bank (see docs/decisions.md). A model without the infrared stem
  (shared stem) is returned as it is.
  """
  variables = flax.core.unfreeze(variables)
  for collection in ('params', 'batch_stats'):
    tree = variables.get(collection, {})
    if 'stem_infrared' in tree:
      tree['stem_infrared'] = jax.tree_util.tree_map(jnp.copy, tree['stem_visible'])
  return variables


def create_train_state(model: CAL, config: ml_collections.ConfigDict, rng: jax.Array,
                       steps_per_epoch: int) -> TrainState:
  """A fresh, unreplicated train state whose `apply_fn` is `model.apply`.

  `model` is the network the train step runs (usually with `axis_name` set
  for synchronised batch norm); it is initialised without the axis.
  """
  variables = jax.jit(initial_variables, static_argnums=(0, 2))(
      model.clone(axis_name=None), rng, (config.data.image_height, config.data.image_width))
  variables = start_stems_equal(variables)
  tx = optim.create_optimizer(config.optim, steps_per_epoch)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables['batch_stats'], tx=tx)


def count_parameters(params: Any) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))

