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


def create_train_state(model: CAL, config: ml_collections.ConfigDict, rng: jax.Array,
                       steps_per_epoch: int) -> TrainState:
  """A fresh, unreplicated train state whose `apply_fn` is `model.apply`.

  `model` is the network the train step runs (usually with `axis_name` set
  for synchronised batch norm); it is initialised without the axis.
  """
  variables = jax.jit(initial_variables, static_argnums=(0, 2))(
      model.clone(axis_name=None), rng, (config.data.image_height, config.data.image_width))
  tx = optim.create_optimizer(config.optim, steps_per_epoch)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables['batch_stats'], tx=tx)


def count_parameters(params: Any) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))

