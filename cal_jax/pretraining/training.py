"""Supervised pretraining of the CAL backbone on fractal categories (`fractals`).

The network is `resnet.ResNet` (the module CAL uses as its backbone, RGB input)
with global average pooling and a linear classifier over the categories, trained
by SGD with momentum and weight decay on a cosine schedule with linear warm-up,
on images drawn afresh at every step (an endless data set: no image repeats).
Inputs are normalised with the ImageNet mean and std, as CAL's input pipeline
normalises its images, so the pretrained stem sees inputs of the scale it will see.

  settings = Settings.from_config(config)      # configs/pretrain.py
  variables, curve = pretrain(settings)         # {'params', 'batch_stats'}, [Record]
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from cal_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from cal_jax.models import resnet
from cal_jax.pretraining import fractals


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one pretraining run needs, read once from the config."""

  seed: int
  depth: int
  width: int
  last_stride: int
  num_categories: int
  min_maps: int
  max_maps: int
  render: fractals.RenderSettings
  batch_size: int
  num_steps: int
  warmup_steps: int
  base_lr: float
  momentum: float
  weight_decay: float
  log_every_steps: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
    d, o = config.data, config.optim
    settings = cls(
      seed=config.seed,
      depth=config.model.depth,
      width=config.model.width,
      last_stride=config.model.last_stride,
      num_categories=d.num_categories,
      min_maps=d.min_maps,
      max_maps=d.max_maps,
      render=fractals.RenderSettings(d.image_height, d.image_width, d.chains, d.iterations),
      batch_size=o.batch_size,
      num_steps=o.num_steps,
      warmup_steps=o.warmup_steps,
      base_lr=o.base_lr,
      momentum=o.momentum,
      weight_decay=o.weight_decay,
      log_every_steps=config.log_every_steps,
    )
    settings.check()
    return settings

  def check(self) -> None:
    resnet.check_depth(self.depth)
    problems = [
      f'config.{name}={value} must be {rule}'
      for name, value, ok, rule in (
        ('model.width', self.width, self.width >= 1, '>= 1'),
        ('model.last_stride', self.last_stride, self.last_stride in (1, 2), '1 or 2'),
        ('data.num_categories', self.num_categories, self.num_categories >= 2, '>= 2'),
        ('data.min_maps', self.min_maps, 2 <= self.min_maps <= self.max_maps, 'in [2, max_maps]'),
        ('data.image_height', self.render.height, self.render.height >= 32, '>= 32'),
        ('data.image_width', self.render.width, self.render.width >= 32, '>= 32'),
        ('data.chains', self.render.chains, self.render.chains >= 1, '>= 1'),
        (
          'data.iterations',
          self.render.iterations,
          self.render.iterations > fractals.BURN_IN,
          f'> {fractals.BURN_IN} (the burn-in)',
        ),
        ('optim.batch_size', self.batch_size, self.batch_size >= 2, '>= 2'),
        ('optim.num_steps', self.num_steps, self.num_steps >= 1, '>= 1'),
        ('optim.warmup_steps', self.warmup_steps, self.warmup_steps >= 0, '>= 0'),
        ('optim.base_lr', self.base_lr, self.base_lr > 0, '> 0'),
        ('log_every_steps', self.log_every_steps, self.log_every_steps >= 1, '>= 1'),
      )
      if not ok
    ]
    if problems:
      raise ValueError('; '.join(problems))


class Classifier(nn.Module):
  """`resnet.ResNet` (as 'backbone'), global average pooling, a linear 'fc'."""

  depth: int
  width: int
  last_stride: int
  num_classes: int

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, 3] normalised images -> logits [B, num_classes]."""
    maps = resnet.ResNet(self.depth, self.width, self.last_stride, name='backbone')(images, train)
    return nn.Dense(self.num_classes, name='fc')(maps.mean(axis=(1, 2)))


class TrainState(train_state.TrainState):
  batch_stats: dict = None


@dataclasses.dataclass(frozen=True)
class Record:
  """Means over the steps since the previous record."""

  step: int
  loss: float
  accuracy: float
  learning_rate: float
  seconds: float  # since the start of training, compilation included


def create_model(settings: Settings) -> Classifier:
  return Classifier(settings.depth, settings.width, settings.last_stride, settings.num_categories)


def learning_rate(settings: Settings) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
    0.0, settings.base_lr, settings.warmup_steps, max(settings.num_steps, settings.warmup_steps + 1)
  )


def create_state(settings: Settings) -> TrainState:
  model = create_model(settings)
  shape = (1, settings.render.height, settings.render.width, 3)
  variables = jax.jit(model.init)(jax.random.key(settings.seed), jnp.zeros(shape, jnp.float32))
  tx = optax.chain(
    optax.add_decayed_weights(settings.weight_decay),
    optax.sgd(learning_rate(settings), momentum=settings.momentum),
  )
  return TrainState.create(
    apply_fn=model.apply, params=variables['params'], batch_stats=variables['batch_stats'], tx=tx
  )


def normalise(images: jax.Array) -> jax.Array:
  """[B, H, W, 3] in [0, 1] -> ImageNet-normalised, as CAL's input pipeline."""
  return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def batch(
  key: jax.Array,
  systems: tuple[jax.Array, ...],
  batch_size: int,
  num_categories: int,
  render: fractals.RenderSettings,
) -> tuple[jax.Array, jax.Array]:
  """(images [B, H, W, 3] in [0, 1], labels [B]) drawn from `key`."""
  k_labels, k_images = jax.random.split(key)
  labels = jax.random.randint(k_labels, (batch_size,), 0, num_categories)
  return fractals.render_batch(k_images, systems, labels, render), labels


@functools.partial(jax.jit, static_argnames=('settings',), donate_argnums=(0,))
def train_step(
  state: TrainState, systems: tuple[jax.Array, ...], settings: Settings
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on a fresh batch keyed by (seed, step): cross-entropy over categories."""
  key = jax.random.fold_in(jax.random.key(settings.seed), state.step)
  images, labels = batch(
    key, systems, settings.batch_size, settings.num_categories, settings.render
  )

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      normalise(images),
      train=True,
      mutable=['batch_stats'],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {
    'loss': loss,
    'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
    'learning_rate': learning_rate(settings)(state.step),
  }
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def pretrain(
  settings: Settings, report: Callable[[Record], None] = lambda record: None
) -> tuple[dict, dict, list[Record]]:
  """Trains the classifier; returns (backbone variables {'params', 'batch_stats'} of
  `resnet.ResNet`, the classifier {'kernel' [C_in, classes], 'bias'}, the curve).
  `report` is called with each record as it is made."""
  systems = fractals.sample_systems(
    settings.seed, settings.num_categories, settings.min_maps, settings.max_maps
  )
  arrays = tuple(jnp.asarray(a) for a in (systems.linear, systems.shift, systems.probability))
  state = create_state(settings)
  start, curve, sums, count = time.perf_counter(), [], None, 0
  for step in range(1, settings.num_steps + 1):
    state, metrics = train_step(state, arrays, settings)
    sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    count += 1
    if step % settings.log_every_steps == 0 or step == settings.num_steps:
      means = {name: float(value) / count for name, value in sums.items()}
      if not all(map(lambda v: v == v and abs(v) != float('inf'), means.values())):
        raise FloatingPointError(f'pretraining diverged at step {step}: {means}')
      record = Record(
        step, means['loss'], means['accuracy'], means['learning_rate'], time.perf_counter() - start
      )
      curve.append(record)
      report(record)
      sums, count = None, 0
  backbone = {
    'params': jax.device_get(state.params['backbone']),
    'batch_stats': jax.device_get(state.batch_stats['backbone']),
  }
  return backbone, jax.device_get(state.params['fc']), curve
