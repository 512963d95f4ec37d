"""The fractal generator (cal_jax/pretraining/fractals.py) against formulations written here."""

import ast
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cal_jax.pretraining import fractals

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = fractals.RenderSettings(height=64, width=32, chains=64, iterations=24)


def _arrays(systems):
  return tuple(jnp.asarray(a) for a in (systems.linear, systems.shift, systems.probability))


@pytest.fixture(scope='module')
def systems():
  return fractals.sample_systems(seed=3, num_categories=6, min_maps=2, max_maps=4)


def test_systems_follow_the_sigma_factor(systems):
  """Singular values by numpy's SVD: every map contracts, s1 + 2 s2 summed over the maps
  lies in Anderson and Farrell's [(5 + N) / 2, (6 + N) / 2], and the maps are chosen
  with probability proportional to |det A| (FractalDB)."""
  counts = set()
  for linear, probability in zip(systems.linear, systems.probability):
    used = probability > 0
    n = int(used.sum())
    counts.add(n)
    values = np.linalg.svd(linear[used].astype(np.float64), compute_uv=False)  # [n, 2]
    assert (values <= 1 + 1e-5).all()
    sigma = float((values[:, 0] + 2 * values[:, 1]).sum())
    assert (5 + n) / 2 - 1e-4 <= sigma <= (6 + n) / 2 + 1e-4
    det = np.abs(np.linalg.det(linear[used].astype(np.float64)))
    np.testing.assert_allclose(probability[used], det / det.sum(), rtol=1e-5)
  assert counts <= {2, 3, 4} and len(counts) >= 2


def _attractor(linear: np.ndarray, shift: np.ndarray) -> np.ndarray:
  """Points [P, 2] of the attractor by the deterministic algorithm: from the fixed point
  of the first map, S <- S u w_1(S) u ... u w_N(S) on a grid of 1/1000 of the attractor's
  extent (maps applied to the cells added last), until no cell is added."""
  start = np.linalg.solve(np.eye(2) - linear[0], shift[0])[None]
  rough = start
  for _ in range(6):  # a rough extent from all compositions of six maps
    rough = np.concatenate([rough @ a.T + b for a, b in zip(linear, shift)])
  cell = float((rough.max(0) - rough.min(0)).max()) / 1000
  code = lambda cells: cells[:, 0] * 1_000_003 + cells[:, 1]
  cells = np.round(start / cell).astype(np.int64)
  seen, new = set(code(cells).tolist()), cells
  while len(new):
    moved = np.concatenate([(new * cell) @ a.T + b for a, b in zip(linear, shift)])
    moved = np.unique(np.round(moved / cell).astype(np.int64), axis=0)
    fresh = np.array([k not in seen for k in code(moved).tolist()], bool)
    new = moved[fresh]
    seen.update(code(new).tolist())
    cells = np.concatenate([cells, new])
  return cells * cell


def _occupancy(points: np.ndarray, low: np.ndarray, high: np.ndarray, shape: tuple) -> np.ndarray:
  """Pixels [H, W] hit by `points` (x, y), the box [low, high] fitted to the image;
  points outside the box are dropped."""
  h, w = shape
  unit = (points - low) / (high - low)
  rows, cols = (
    np.round(unit[:, 1] * (h - 1)).astype(int),
    np.round(unit[:, 0] * (w - 1)).astype(int),
  )
  inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
  grid = np.zeros(shape, bool)
  grid[rows[inside], cols[inside]] = True
  return grid


def _dilate(grid: np.ndarray) -> np.ndarray:
  padded = np.pad(grid, 1)
  h, w = grid.shape
  shifts = itertools.product((-1, 0, 1), (-1, 0, 1))
  return np.any([padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in shifts], axis=0)


def test_the_chaos_game_draws_the_attractor_of_the_hutchinson_operator(systems):
  shape, coverage = (64, 64), []
  for c in range(systems.num_categories):
    used = systems.probability[c] > 0
    linear, shift = systems.linear[c][used].astype(np.float64), systems.shift[c][used]
    attractor = _attractor(linear, shift)
    low, high = attractor.min(0), attractor.max(0)
    reference = _occupancy(attractor, low, high, shape)
    one = (jnp.asarray(a[c]) for a in (systems.linear, systems.shift, systems.probability))
    points, maps = fractals.chaos_game(jax.random.key(c), *one, 512, 40)
    assert points.shape == (512 * (40 - fractals.BURN_IN), 2)
    assert int(maps.max()) < used.sum()  # a map of probability 0 is never drawn
    drawn = _occupancy(np.asarray(points), low, high, shape)
    # Every drawn point lies on (next to) the attractor, inside its box.
    assert (drawn & ~_dilate(reference)).sum() <= 0.02 * drawn.sum()
    margin = 0.02 * (high - low)
    outside = ((np.asarray(points) < low - margin) | (np.asarray(points) > high + margin)).any(1)
    assert outside.mean() <= 0.01
    coverage.append((reference & _dilate(drawn)).sum() / reference.sum())
  # The chaos game draws the attractor's invariant measure (maps chosen by |det A|): its
  # thinnest parts may go undrawn, but most of every attractor is drawn.
  assert min(coverage) > 0.5 and np.mean(coverage) > 0.85, coverage


def test_points_fill_the_box_they_are_fitted_to():
  points = jnp.array([[2.0, -1.0], [4.0, 3.0], [3.0, 1.0]])  # x in [2, 4], y in [-1, 3]
  pixels = np.asarray(fractals.to_pixels(points, jnp.array([10.0, 5.0, 30.0, 15.0])))
  np.testing.assert_array_equal(pixels, [[10, 5], [30, 15], [20, 10]])  # (row, column)


def test_images_are_keyed_and_categories_differ(systems):
  arrays = _arrays(systems)
  labels = jnp.array([0, 1, 2, 3, 0, 0])
  first = np.asarray(fractals.render_batch(jax.random.key(5), arrays, labels, SETTINGS))
  again = np.asarray(fractals.render_batch(jax.random.key(5), arrays, labels, SETTINGS))
  other = np.asarray(fractals.render_batch(jax.random.key(6), arrays, labels, SETTINGS))
  assert first.shape == (6, 64, 32, 3) and first.min() >= 0 and first.max() <= 1
  np.testing.assert_array_equal(first, again)  # same key, same images
  assert all(not np.array_equal(a, b) for a, b in zip(first, other))  # new key, new images
  # One image's key and category fix it: the first image does not depend on the others.
  alone = fractals.render_batch(jax.random.key(5), arrays, labels[:1], SETTINGS)
  np.testing.assert_array_equal(first[:1], np.asarray(alone))
  # Different categories under one key: the same box, colours and background, and
  # different shapes.
  same_key = np.asarray(
    jax.vmap(lambda c: fractals.render_one(jax.random.key(9), *(a[c] for a in arrays), SETTINGS))(
      jnp.arange(4)
    )
  )
  for a, b in itertools.combinations(same_key, 2):
    differ = (a != b).any(-1).mean()
    assert 0.01 < differ < 0.9


def test_the_generator_draws_no_people():
  """No module of the pretraining package imports the synthetic data sets."""
  folder = os.path.join(REPO, 'cal_jax', 'pretraining')
  for name in os.listdir(folder):
    if name.endswith('.py'):
      with open(os.path.join(folder, name), encoding='utf-8') as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
          assert not (node.module or '').startswith('cal_jax.data.datasets'), name
        if isinstance(node, ast.Import):
          assert not any(a.name.startswith('cal_jax.data.datasets') for a in node.names), name
