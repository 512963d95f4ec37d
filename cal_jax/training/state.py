"""The train state: parameters, batch-norm statistics, optimiser state, step.

build_model             the CAL network of a config: config.model, and what config.loss needs of it
create_train_state      a fresh state of a CAL network
initial_state           the same, with config.model.pretrained's ImageNet backbone
pretrained_file         that file, or '' (none given, or 'none': from scratch on purpose)
backbone_lr_mult        the backbone's learning-rate multiplier: 1 with 'none'
abstract_train_state    the shapes of a config's state: the template a restore fills
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
from flax.training import train_state

from cal_jax.data.datasets import specs
from cal_jax.models import torchvision_weights
from cal_jax.models.cal import CAL, create_model
from cal_jax.training import optim


class TrainState(train_state.TrainState):
  batch_stats: Any = None


# Table 4's replacements of L_pcl that keep learnt centres in the network.
CENTRE_FORMS = ('center', 'ica_cca')


def build_model(
  config: ml_collections.ConfigDict, num_classes: int, axis_name: str | None = None
) -> CAL:
  """The CAL network of a run: `config.model`, with what the objective needs of the network
  worked out here, once, from `config.loss` (and the data set's cameras for ICA&CCA)."""
  form = config.loss.pcl_form
  return create_model(
    config.model,
    num_classes=num_classes,
    class_centers=form in CENTRE_FORMS,
    num_cameras=len(specs.camera_classes(config.data.name)) if form == 'ica_cca' else 0,
    kd2_attention_gradient=config.loss.kd2_attention_gradient,
    axis_name=axis_name,
  )


def initial_variables(
  model: CAL, rng: jax.Array, image_shape: tuple[int, int]
) -> flax.core.FrozenDict:
  """Initialise the CAL network on a dummy batch of two images per modality."""
  images = jnp.zeros((2, *image_shape, 3), jnp.float32)
  partners = jnp.zeros((2,), jnp.int32)
  return model.init(rng, images, images, partners, partners, train=False)


def start_stems_equal(variables: Any) -> dict:
  """Both modality-specific stems start from the same weights: the visible stem's.

  With ImageNet weights both stems are loaded from the same `conv1`/`bn1`
  (`torchvision_weights.apply_to_cal`); from scratch this does the same with the random
  initialisation, so the shared stages first see both modalities through one
  filter bank (see docs/decisions/model_and_losses.md). A model without the infrared stem
  (shared stem) is returned as it is.
  """
  variables = flax.core.unfreeze(variables)
  for collection in ('params', 'batch_stats'):
    tree = variables.get(collection, {})
    if 'stem_infrared' in tree:
      tree['stem_infrared'] = jax.tree_util.tree_map(jnp.copy, tree['stem_visible'])
  return variables


PRETRAINED_NONE = torchvision_weights.PRETRAINED_NONE


def pretrained_file(config: ml_collections.ConfigDict) -> str:
  """The torchvision state dict the backbone starts from, or ''."""
  path = config.model.pretrained
  return '' if path == PRETRAINED_NONE else path


def backbone_lr_mult(config: ml_collections.ConfigDict) -> float:
  """AGW's 0.1x rate is for a pretrained backbone: with `pretrained='none'` (from scratch
  on purpose) the backbone trains at the full rate, whatever `optim.backbone_lr_mult`."""
  if config.model.pretrained == PRETRAINED_NONE:
    return 1.0
  return config.optim.backbone_lr_mult


def create_train_state(
  model: CAL, config: ml_collections.ConfigDict, rng: jax.Array, steps_per_epoch: int
) -> TrainState:
  """A fresh, unreplicated train state whose `apply_fn` is `model.apply`.

  `model` is the network the train step runs (usually with `axis_name` set
  for synchronised batch norm); it is initialised without the axis.
  """
  variables = jax.jit(initial_variables, static_argnums=(0, 2))(
    model.clone(axis_name=None), rng, (config.data.image_height, config.data.image_width)
  )
  variables = start_stems_equal(variables)
  tx = optim.create_optimizer(config.optim, steps_per_epoch, backbone_lr_mult(config))
  return TrainState.create(
    apply_fn=model.apply, params=variables['params'], batch_stats=variables['batch_stats'], tx=tx
  )


def count_parameters(params: Any) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def initial_state(
  model: CAL,
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  *,
  load_pretrained: bool = True,
) -> TrainState:
  """A fresh state; with `load_pretrained`, the backbone from config.model.pretrained.

  A state that only serves as the template of a restore does not read the
  ImageNet file (the checkpoint holds the weights): it may be gone by then.
  """
  state = create_train_state(model, config, jax.random.key(config.seed), steps_per_epoch)
  if pretrained_file(config) and load_pretrained:
    backbone = torchvision_weights.load_torchvision_resnet(
      pretrained_file(config), f'resnet{config.model.depth}', width=config.model.width
    )
    variables = torchvision_weights.apply_to_cal(
      {'params': state.params, 'batch_stats': state.batch_stats},
      backbone,
      modality_specific_stem=config.model.modality_specific_stem,
    )
    state = state.replace(
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=state.tx.init(variables['params']),
    )
  return state


def abstract_train_state(config: ml_collections.ConfigDict, num_classes: int) -> TrainState:
  """A restore template of the config's train state, without initialising it.

  Its arrays are shapes and dtypes on this process's first device; `apply_fn`
  and `tx` are those of a real state (the schedule's steps per epoch do not
  change what a checkpoint holds).
  """
  model = build_model(config, num_classes)
  abstract = jax.eval_shape(
    lambda: create_train_state(model, config, jax.random.key(0), steps_per_epoch=1)
  )
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
  )
