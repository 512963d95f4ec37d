"""Pictures: `cal_jax.pictures.plots` on hand-made arrays, then `cal_jax.pictures.figures` and
`python -m cal_jax.visualize` on the shared 2-step tiny run (`tiny_run`)."""

import glob
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cal_jax import visualize
from cal_jax.data.images import resize_images
from cal_jax.evaluation import embedding as inference
from cal_jax.evaluation import evaluator, run
from cal_jax.pictures import figures as pictures
from cal_jax.pictures import plots
from cal_jax.training import restore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.filterwarnings('ignore:gallery of .* is smaller than max_rank')


def _decoded(png: bytes) -> np.ndarray:
  image = Image.open(io.BytesIO(png))
  assert image.format == 'PNG'
  return np.asarray(image.convert('RGB'))


def _assert_not_blank(pixels: np.ndarray, min_size=(200, 200)):
  assert pixels.shape[0] >= min_size[0] and pixels.shape[1] >= min_size[1], pixels.shape
  assert pixels.std() > 20
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # images, not flat fills


def _pixel(pixels, fig, artist, fx, fy):
  """The rendered pixel at fraction (fx, fy) of an artist's box (fy from the top)."""
  box = artist.get_window_extent()
  x = int(box.x0 + fx * box.width)
  y = int(fig.bbox.height - (box.y1 - fy * box.height))
  return pixels[y, x].astype(int)


def _close(colour, want, tolerance=40):
  return np.abs(np.asarray(colour) - np.asarray(want)).max() <= tolerance


def test_ranking_frames_are_green_for_the_same_identity_and_red_otherwise():
  grey = lambda *shape: np.full(shape + (64, 32, 3), 128, np.uint8)
  correct = np.array([[True, False] * 5, [False] * 9 + [True]])
  fig = plots.ranking_figure(
    grey(2), grey(2, 10), correct, ['q0', 'q1'], [[f'g{j}' for j in range(10)]] * 2, 'ranked'
  )
  pixels = plots.to_array(fig)
  for q in range(2):
    query_ax = fig.axes[q * 11]
    assert _close(_pixel(pixels, fig, query_ax.images[0], 0.02, 0.5), (128, 128, 128))
    for j in range(10):
      image = fig.axes[q * 11 + 1 + j].images[0]
      want = plots.CORRECT if correct[q, j] else plots.WRONG
      for fx, fy in ((0.02, 0.5), (0.5, 0.01), (0.98, 0.5)):  # left, top, right edges
        assert _close(_pixel(pixels, fig, image, fx, fy), want), (q, j, fx, fy)
      assert _close(_pixel(pixels, fig, image, 0.5, 0.5), (128, 128, 128))  # inside


def test_part_maps_are_drawn_where_they_are_high():
  """A map hot in its top-left cell is red there and blue in the opposite corner."""
  images = np.full((2, 64, 32, 3), 128, np.uint8)
  maps = np.zeros((2, 2, 4, 2))
  maps[:, 0, 0, 0] = 1.0  # part 1: top left
  maps[:, 1, 3, 1] = 5.0  # part 2: bottom right (scaled to its own maximum)
  fig = plots.part_maps_figure(images, maps, ['a', 'b'], 'maps')
  pixels = plots.to_array(fig)
  assert len(fig.axes) == 2 * 3
  for row in range(2):
    part1, part2 = (fig.axes[row * 3 + c].images[1] for c in (1, 2))
    for image, hot, cold in ((part1, (0.1, 0.1), (0.9, 0.9)), (part2, (0.9, 0.9), (0.1, 0.1))):
      red, blue = _pixel(pixels, fig, image, *hot), _pixel(pixels, fig, image, *cold)
      assert red[0] > red[2] + 40, red
      assert blue[2] > blue[0] + 20, blue


def test_cmc_figure_has_axis_labels_and_a_legend():
  fig = plots.cmc_figure({'a': [10.0, 50.0, 90.0], 'b': [5.0] * 20}, 'CMC')
  ax = fig.axes[0]
  assert ax.get_xlabel() == 'rank' and 'matching rate' in ax.get_ylabel()
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ['a', 'b']
  assert ax.get_xlim() == (1, 20) and ax.get_ylim() == (0, 100)
  _assert_not_blank(_decoded(plots.to_png(fig)), min_size=(300, 400))


def test_cmc_curves_of_an_old_results_file_say_what_to_do():
  with pytest.raises(ValueError, match='no CMC curve.*--mode eval'):
    pictures.cmc_curves({'sysu/all/single': {'R1': 1.0, 'mAP': 2.0}})


def test_periodic_evaluation_writes_the_pictures_and_table_to_tensorboard(tiny_run):
  import tensorflow as tf

  _, workdir = tiny_run
  images, texts = {}, {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == 'images':
          images[value.tag] = value.tensor.string_val[2]
        if value.metadata.plugin_data.plugin_name == 'text':
          texts[value.tag] = value.tensor.string_val[0].decode()
  assert "    SYSU-MM01 (as the paper's Table 1)\n" in texts['eval/table']
  assert sorted(images) == [
    'pictures/attention',
    'pictures/cmc',
    'pictures/ranking',
    'pictures/regions',
  ]
  for png in images.values():
    _assert_not_blank(_decoded(png))


@pytest.fixture(scope='module')
def restored(tiny_run):
  config, workdir = tiny_run
  trained = restore.restore_trained(config, workdir)
  settings = evaluator.EvalSettings.from_config(config)
  embedder = run.make_embedder(trained.model, trained.state, trained.counts.m_hat())
  evaluation = evaluator.evaluate(
    embedder, trained.splits.test, trained.splits.name, settings, keys=['sysu/all/single']
  )
  return trained.splits.test, embedder, evaluation, settings


def test_ranked_lists_are_the_evaluators_ranking(restored):
  """Top-10 by the part-cosine similarity of `inference.embed`, without the gallery
  images SYSU-MM01 removes (camera 2 for a camera-3 query), correct = same identity."""
  test, embedder, evaluation, settings = restored
  ranked = pictures.ranked_lists(evaluation, test, 'sysu/all/single', num_queries=4)
  assert ranked.query.shape == (4,) and ranked.gallery.shape == (4, 10)
  assert (test.modality[ranked.query] == 1).all() and (test.modality[ranked.gallery] == 0).all()
  size, batch = settings.image_size, settings.batch_size

  def embed(indices, modality):  # padded to the evaluation's batch: its compiled embedding
    assert len(indices) <= batch
    padded = np.resize(np.asarray(indices), batch)
    images = pictures.network_input(resize_images(test.image[padded], size))
    return np.asarray(inference.embed(embedder.model, embedder.variables, images, modality))[
      : len(indices)
    ]

  similarity = embed(ranked.query, 1) @ embed(ranked.split.gallery, 0).T
  for q, query in enumerate(ranked.query):
    allowed = ~((test.camera[query] == 3) & (test.camera[ranked.split.gallery] == 2))
    listed = similarity[q][np.searchsorted(ranked.split.gallery, ranked.gallery[q])]
    np.testing.assert_allclose(np.sort(listed)[::-1], listed, atol=1e-5)
    np.testing.assert_allclose(listed, np.sort(similarity[q][allowed])[::-1][:10], atol=1e-5)
    assert allowed[np.searchsorted(ranked.split.gallery, ranked.gallery[q])].all()
  np.testing.assert_array_equal(
    ranked.correct, test.id[ranked.gallery] == test.id[ranked.query][:, None]
  )


def test_draw_writes_every_picture(tiny_run, tmp_path):
  config, workdir = tiny_run
  before = sorted(os.listdir(workdir))
  paths = visualize.draw(config, workdir, list(visualize.KINDS), str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == [
    'attention.png',
    'cmc.png',
    'ranking_sysu_all_single.png',
    'regions.png',
  ]
  for path in paths:
    with open(path, 'rb') as f:
      pixels = _decoded(f.read())
    _assert_not_blank(pixels)
    if 'ranking' in path:  # both frame colours occur
      for colour in (plots.CORRECT, plots.WRONG):
        assert (np.abs(pixels.astype(int) - colour).max(axis=-1) < 10).sum() > 100, colour
  assert sorted(os.listdir(workdir)) == before  # the run is only read


@pytest.mark.slow
def test_visualize_command(tiny_run, tmp_path):
  """The command reads the run's config.json; a folder that is no run is named."""
  _, workdir = tiny_run
  run = lambda *args: subprocess.run(
    [sys.executable, '-m', 'cal_jax.visualize', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  result = run('--workdir', workdir, '--what', 'cmc', '--output', str(tmp_path / 'out'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == [str(tmp_path / 'out' / 'cmc.png')]
  with open(tmp_path / 'out' / 'cmc.png', 'rb') as f:
    _assert_not_blank(_decoded(f.read()))
  # The libraries' lines (Orbax restoring the checkpoint) go to WORKDIR/log.txt, not
  # the terminal, which shows only the written paths.
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  log = copy / 'log.txt'
  before = log.read_text() if log.exists() else ''
  result = run('--workdir', str(copy), '--what', 'regions', '--num_ids', '1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == [str(copy / 'pictures' / 'regions.png')]
  assert 'checkpoint' not in result.stderr.lower(), result.stderr[-3000:]
  after = log.read_text()
  assert after.startswith(before) and 'checkpoint' in after[len(before) :].lower()
  result = run('--workdir', str(tmp_path / 'empty'), '--what', 'regions')
  assert result.returncode != 0
  assert f'{tmp_path / "empty" / "config.json"} does not exist' in result.stderr
  assert 'Traceback' not in result.stderr
