"""Fractal categories and their images: formula-driven data for supervised pretraining.

A category is an iterated function system (IFS) of 2-4 affine maps of the plane,
w_i(p) = A_i p + b_i, chosen with probability proportional to |det A_i| (FractalDB,
Kataoka et al., ACCV 2020). Its linear parts are drawn by the sigma-factor of Anderson
and Farrell ("Improving Fractal Pre-training", WACV 2022): A_i = R(theta) diag(s1, s2)
R(phi) D with singular values 1 >= s1 >= s2 > 0 whose sum over the maps of s1 + 2 s2
lies in [(5 + N) / 2, (6 + N) / 2]; every map contracts, so no system diverges and no
filtering by fill rate is needed.

An image of a category [H, W, 3] in [0, 1] is drawn by the chaos game: `chains`
points start at the origin and each moves `iterations` times by a map drawn with the
system's probabilities; the points after `BURN_IN` steps are the attractor. They are
scaled into a random box of the canvas (its bounding box fitted to the box, optionally
mirrored) and painted over a random background, each point in the colour of the map
that put it there (colours drawn per image, so that shape and not colour tells the
categories apart). The categories come from numpy (`sample_systems`, once); the images
from JAX (`render_batch`, jitted inside the training step), keyed by a PRNG key.

Nothing here draws people: this module imports no person generator.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

# Bump when the images for a given config change: it keys the cache of pretrained files.
GENERATOR_VERSION = 1
BURN_IN = 8  # chaos-game steps before the points are on the attractor (contraction)
MIN_BOX = 0.5  # the fractal fills at least this fraction of each side of the canvas


@dataclasses.dataclass(frozen=True)
class Systems:
  """IFS parameters of C categories, padded to the most maps N (probability 0)."""

  linear: np.ndarray  # [C, N, 2, 2]
  shift: np.ndarray  # [C, N, 2]
  probability: np.ndarray  # [C, N], rows sum to 1

  @property
  def num_categories(self) -> int:
    return self.linear.shape[0]


@dataclasses.dataclass(frozen=True)
class RenderSettings:
  """How many points draw an image, and its size."""

  height: int
  width: int
  chains: int  # points moved in parallel per image
  iterations: int  # steps of each point, BURN_IN of them not drawn


def _rotation(angle: float) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s], [s, c]])


def _singular_values(rng: np.random.Generator, num_maps: int) -> np.ndarray:
  """[num_maps, 2] singular values (s1 >= s2, both in (0, 1]) whose sigma-factor
  sum(s1 + 2 s2) is uniform in [(5 + N) / 2, (6 + N) / 2] (by rejection)."""
  target = rng.uniform((5 + num_maps) / 2, (6 + num_maps) / 2)
  while True:
    share = rng.dirichlet(np.ones(2 * num_maps)) * target
    values = np.stack([share[0::2], share[1::2] / 2], axis=1)
    if np.all(values <= 1.0) and np.all(values[:, 1] <= values[:, 0]):
      return values


def sample_system(rng: np.random.Generator, num_maps: int) -> tuple[np.ndarray, np.ndarray]:
  """One IFS: linear parts [num_maps, 2, 2] and shifts [num_maps, 2]."""
  values = _singular_values(rng, num_maps)
  linear = []
  for s1, s2 in values:
    flip = np.diag(rng.choice([-1.0, 1.0], size=2))
    linear.append(
      _rotation(rng.uniform(0, 2 * np.pi))
      @ np.diag([s1, s2])
      @ _rotation(rng.uniform(0, 2 * np.pi))
      @ flip
    )
  return np.stack(linear), rng.uniform(-1.0, 1.0, size=(num_maps, 2))


def sample_systems(seed: int, num_categories: int, min_maps: int, max_maps: int) -> Systems:
  """`num_categories` IFS of `min_maps`..`max_maps` maps each, drawn from `seed`."""
  if not 2 <= min_maps <= max_maps:
    raise ValueError(f'need 2 <= min_maps <= max_maps, got {min_maps}, {max_maps}')
  rng = np.random.default_rng([seed, 7])
  linear = np.zeros((num_categories, max_maps, 2, 2))
  shift = np.zeros((num_categories, max_maps, 2))
  probability = np.zeros((num_categories, max_maps))
  for c in range(num_categories):
    n = int(rng.integers(min_maps, max_maps + 1))
    linear[c, :n], shift[c, :n] = sample_system(rng, n)
    det = np.abs(np.linalg.det(linear[c, :n]))
    probability[c, :n] = det / det.sum()
  return Systems(
    linear.astype(np.float32), shift.astype(np.float32), probability.astype(np.float32)
  )


def chaos_game(
  key: jax.Array,
  linear: jax.Array,
  shift: jax.Array,
  probability: jax.Array,
  chains: int,
  iterations: int,
) -> tuple[jax.Array, jax.Array]:
  """Points on one system's attractor and the maps that placed them.

  Args: linear [N, 2, 2], shift [N, 2], probability [N] of one system.
  Returns: points [(iterations - BURN_IN) * chains, 2] and map indices [same].
  """
  logits = jnp.log(jnp.maximum(probability, 1e-30))
  choices = jax.random.categorical(key, logits, shape=(iterations, chains))

  def step(points, maps):
    moved = jnp.einsum('pij,pj->pi', linear[maps], points) + shift[maps]
    return moved, moved

  _, trace = jax.lax.scan(step, jnp.zeros((chains, 2), jnp.float32), choices)
  return trace[BURN_IN:].reshape(-1, 2), choices[BURN_IN:].reshape(-1)


def to_pixels(points: jax.Array, box: jax.Array) -> jax.Array:
  """Integer (row, column) [P, 2] of `points` [P, 2] (x, y) whose bounding box is
  fitted to `box` = (top, left, bottom, right) in pixels (bottom, right inclusive)."""
  low, high = points.min(0), points.max(0)
  unit = (points - low) / jnp.maximum(high - low, 1e-6)  # [0, 1]^2
  rows = box[0] + unit[:, 1] * (box[2] - box[0])
  cols = box[1] + unit[:, 0] * (box[3] - box[1])
  return jnp.stack([jnp.round(rows), jnp.round(cols)], axis=1).astype(jnp.int32)


def _colours(key: jax.Array, count: int) -> jax.Array:
  """[count, 3] saturated random colours (hue, saturation, value drawn)."""
  k_hue, k_sat, k_val = jax.random.split(key, 3)
  hue = jax.random.uniform(k_hue, (count, 1))
  sat = jax.random.uniform(k_sat, (count, 1), minval=0.4, maxval=1.0)
  val = jax.random.uniform(k_val, (count, 1), minval=0.5, maxval=1.0)
  rgb = jnp.clip(jnp.abs((hue * 6 + jnp.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
  return val * (1 - sat + sat * rgb)


def render_one(
  key: jax.Array,
  linear: jax.Array,
  shift: jax.Array,
  probability: jax.Array,
  settings: RenderSettings,
) -> jax.Array:
  """One image [H, W, 3] in [0, 1] of one system (see the module docstring)."""
  h, w = settings.height, settings.width
  k_points, k_box, k_flip, k_ink, k_bg, k_grad = jax.random.split(key, 6)
  points, maps = chaos_game(
    k_points, linear, shift, probability, settings.chains, settings.iterations
  )
  size = jax.random.uniform(k_box, (4,))
  extent = jnp.array([h - 1, w - 1], jnp.float32)
  span = extent * (MIN_BOX + (1 - MIN_BOX) * size[:2])
  top_left = (extent - span) * size[2:]
  box = jnp.concatenate([top_left, top_left + span])
  mirror = jax.random.bernoulli(k_flip)
  points = points * jnp.where(mirror, jnp.array([-1.0, 1.0]), jnp.array([1.0, 1.0]))
  pixels = to_pixels(points, box)
  ink = _colours(k_ink, linear.shape[0])[maps]  # [P, 3]
  # A background of one dark colour with a vertical or horizontal gradient.
  base = 0.5 * _colours(k_bg, 1)[0]
  grad = jax.random.uniform(k_grad, (2,), minval=-0.2, maxval=0.2)
  yy = jnp.linspace(-1, 1, h)[:, None, None]
  xx = jnp.linspace(-1, 1, w)[None, :, None]
  background = jnp.clip(base + grad[0] * yy + grad[1] * xx, 0, 1)
  flat = pixels[:, 0] * w + pixels[:, 1]
  # max is order-free, so duplicated pixels give the same image on every run.
  painted = jnp.zeros((h * w, 3)).at[flat].max(ink).reshape(h, w, 3)
  drawn = jnp.zeros((h * w,)).at[flat].max(1.0).reshape(h, w, 1)
  return jnp.where(drawn > 0, painted, background)


@functools.partial(jax.jit, static_argnames=('settings',))
def render_batch(
  key: jax.Array,
  systems: tuple[jax.Array, jax.Array, jax.Array],
  labels: jax.Array,
  settings: RenderSettings,
) -> jax.Array:
  """Images [B, H, W, 3] in [0, 1] of the categories `labels` [B].

  `systems` is (linear, shift, probability) of `Systems`, as arrays. Image b is
  drawn from `fold_in(key, b)`: a key and labels give the same images on every run.
  """
  linear, shift, probability = systems
  keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(labels.shape[0]))
  one = functools.partial(render_one, settings=settings)
  return jax.vmap(one)(keys, linear[labels], shift[labels], probability[labels])
