"""data.synthetic_misalignment: people framed as a detector's boxes frame them.

The person is found from the pixels alone: one identity is rendered twice from one
random stream, once all black and once all white (same body, same background,
same noise), so that the pixels that differ are the visible person.
"""

import dataclasses
import filecmp
import hashlib
import os

import numpy as np

from cal_jax.data.datasets import synthetic
from cal_jax.data.datasets import synthetic_people as people

SIZE = (128, 64)
IMAGES = 40
# sha256 of `_old_way_digest()`'s renders, computed with the generator as it was before
# the field existed (commit 0421c1d): with the field off the images stay bit for bit.
OLD_WAY = '053591a777d3172f34132c8d73c2b9cfef91c0b7a26ff64b5151c392b8191489'


def _old_way_digest(**camera_fields) -> str:
  digest = hashlib.sha256()
  for sensor in ('visible', 'nir', 'thermal'):
    for k in range(4):
      rng = np.random.default_rng([11, k])
      app = people.sample_appearance(rng)
      cam = dataclasses.replace(
        people.sample_camera(rng, sensor, low_light=k == 3), **camera_fields
      )
      for n in range(3):
        digest.update(people.render(app, cam, np.random.default_rng([12, k, n]), SIZE).tobytes())
  return digest.hexdigest()


def test_off_is_the_generator_as_it_was():
  assert _old_way_digest() == OLD_WAY
  assert _old_way_digest(misalignment=False) == OLD_WAY
  assert _old_way_digest(misalignment=True) != OLD_WAY


def test_off_writes_the_same_tree_as_before(tmp_path):
  synthetic.generate('sysu', str(tmp_path / 'default'), num_ids=6, seed=4, height=48)
  synthetic.generate(
    'sysu', str(tmp_path / 'off'), num_ids=6, seed=4, height=48, misalignment=False
  )
  synthetic.generate('sysu', str(tmp_path / 'on'), num_ids=6, seed=4, height=48, misalignment=True)
  files = sorted(
    os.path.relpath(os.path.join(d, f), tmp_path / 'default')
    for d, _, names in os.walk(tmp_path / 'default')
    for f in names
  )
  same, different, _ = filecmp.cmpfiles(tmp_path / 'default', tmp_path / 'off', files, False)
  assert not different and len(same) == len(files)
  images = [f for f in files if f.endswith('.jpg')]
  _, changed, _ = filecmp.cmpfiles(tmp_path / 'default', tmp_path / 'on', images, False)
  assert len(changed) == len(images)


def _plain(colour) -> dict:
  """Every colour of an appearance set to `colour`."""
  garment = dict(colour=colour, colour2=colour)
  return dict(skin=colour, hair_colour=colour, shoes=colour, bag_colour=colour, garment=garment)


def _person_boxes(misalignment: bool, seed: int = 0) -> np.ndarray:
  """[IMAGES, 4] (top, bottom, left, right) of the visible person in each image of
  one identity by one visible camera (rows/columns in pixels, inclusive)."""
  rng = np.random.default_rng([seed, 1])
  app = people.sample_appearance(rng)
  cam = dataclasses.replace(
    people.sample_camera(rng, 'visible'), noise=0.0, misalignment=misalignment
  )
  twins = []
  for colour in ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)):
    fields = _plain(colour)
    garment = fields.pop('garment')
    twins.append(
      dataclasses.replace(
        app,
        upper=dataclasses.replace(app.upper, **garment),
        lower=dataclasses.replace(app.lower, **garment),
        **fields,
      )
    )
  boxes = []
  for n in range(IMAGES):
    black, white = (
      people.render(twin, cam, np.random.default_rng([seed, 2, n]), SIZE).astype(int)
      for twin in twins
    )
    person = np.abs(white - black).max(-1) > 40
    rows, cols = np.flatnonzero(person.any(1)), np.flatnonzero(person.any(0))
    boxes.append((rows[0], rows[-1], cols[0], cols[-1]) if rows.size else (-1, -1, -1, -1))
  return np.array(boxes)


def test_on_moves_and_scales_the_person_in_the_frame():
  still, moving = _person_boxes(False), _person_boxes(True)
  assert (still[:, 0] >= 0).all()  # the person is found in every image
  visible = moving[moving[:, 0] >= 0]
  assert len(visible) >= IMAGES * 0.9
  for boxes in (still, visible):
    assert (boxes[:, 1] > boxes[:, 0]).all()

  def spread(boxes):
    height = boxes[:, 1] - boxes[:, 0]
    centre = (boxes[:, 2] + boxes[:, 3]) / 2
    return np.std(boxes[:, 0]), np.std(height), np.std(centre)

  still_top, still_height, still_centre = spread(still)
  top, height, centre = spread(visible)
  # Today's people stand at about one place and size; detector boxes spread them.
  assert top > 2.5 * still_top and top > 8
  assert height > 2.5 * still_height and height > 8
  assert centre > 2 * still_centre and centre > 4
  # Some boxes cut the person at the head or the feet (the person reaches an edge
  # of the image), which today's never do.
  cut = (visible[:, 0] == 0) | (visible[:, 1] == SIZE[0] - 1)
  assert not ((still[:, 0] == 0) | (still[:, 1] == SIZE[0] - 1)).any()
  assert cut.sum() >= 3


def test_on_is_deterministic_by_seed():
  np.testing.assert_array_equal(_person_boxes(True, seed=3), _person_boxes(True, seed=3))
  assert not np.array_equal(_person_boxes(True, seed=3), _person_boxes(True, seed=4))


def test_occluders_enter_from_an_edge():
  tone = lambda c: np.asarray(c, np.float32)
  changed = 0
  for seed in range(30):
    image = np.full((64, 32, 3), 2.0, np.float32)  # a value no colour has
    people._occlude(image, np.random.default_rng(seed), tone)  # noqa: SLF001
    covered = (image != 2.0).any(-1)
    if covered.any():
      changed += 1
      rows, cols = np.flatnonzero(covered.any(1)), np.flatnonzero(covered.any(0))
      assert rows[-1] == 63 or cols[0] == 0 or cols[-1] == 31
  assert 10 <= changed <= 28  # some images have none, most have one or two
