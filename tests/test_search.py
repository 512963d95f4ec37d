"""`python -m cal_jax.search` end to end on a generated folder pair, with an exported model.

The model is the tiny CAL exported to .safetensors; the folders are a synthetic
SYSU-MM01's test identities, infrared queries and visible gallery, one
sub-folder per identity. The results are checked against the same model's
embeddings computed here with `torch_model`, and the command's errors are one line.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import NUM_CLASSES

from cal_jax.data.datasets import synthetic
from cal_jax.evaluation import gallery_search as search
from cal_jax.interop import export

torch = pytest.importorskip('torch')
from cal_jax.interop import torch_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('single_torch_thread')]


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  base = tmp_path_factory.mktemp('search')
  root = base / 'sysu'
  synthetic.generate('sysu', str(root), num_ids=12, seed=0, images_per_camera=(2, 3), height=48)
  test_ids = open(root / 'exp' / 'test_id.txt').read().strip().split(',')
  for role, cams in (('query', ('cam3', 'cam6')), ('gallery', ('cam1', 'cam2', 'cam4', 'cam5'))):
    for pid in test_ids:
      for cam in cams:
        source = root / cam / f'{int(pid):04d}'
        if source.is_dir():
          for name in os.listdir(source):
            target = base / role / pid / f'{cam}_{name}'
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, target)
  return base


@pytest.fixture(scope='module')
def model_file(tmp_path_factory, tiny_config, tiny_state):
  path = str(tmp_path_factory.mktemp('model') / 'cal.safetensors')
  variables = {'params': tiny_state.params, 'batch_stats': tiny_state.batch_stats}
  export.export(variables, tiny_config, NUM_CLASSES, path)
  return path


def run(*args):
  return subprocess.run(
    [sys.executable, '-m', 'cal_jax.search', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


def common(folders, model_file, out):
  return [
    '--model', model_file,
    '--query', str(folders / 'query'), '--query_modality', 'infrared',
    '--gallery', str(folders / 'gallery'), '--gallery_modality', 'visible',
    '--output', str(out), '--top_k', '3',
  ]  # fmt: skip


def torch_features(model_file, image_set):
  net = torch_model.load(model_file)
  split = image_set.split()
  from cal_jax.evaluation.embedding import extract_features

  def embed(images, modality):
    with torch.no_grad():
      return net(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), modality)

  return extract_features(
    lambda i, m: embed(i, m).numpy(),
    split,
    np.arange(len(split)),
    modality=image_set.modality,
    image_size=tuple(net.metadata['image_size']),
    batch_size=16,
    flip=True,
    num_parts=int(net.metadata['config']['num_parts']),
  )


def test_search_writes_matches_metrics_and_reuses_its_cache(tmp_path, folders, model_file):
  out = tmp_path / 'out'
  first = run(*common(folders, model_file, out))
  assert first.returncode == 0, first.stderr[-3000:]
  query = search.read_folder(str(folders / 'query'), 'infrared', 'query')
  gallery = search.read_folder(str(folders / 'gallery'), 'visible', 'gallery')
  n = len(query.paths) + len(gallery.paths)
  assert f'({n} embedded, 0 from the cache)' in first.stdout
  assert 'oneDNN' not in first.stderr and 'orbax' not in first.stderr
  for name in ('matches.csv', 'matches.json', 'ranking.png', 'scores.png', 'features.npz'):
    assert (out / name).exists(), name

  q, g = torch_features(model_file, query), torch_features(model_file, gallery)
  want_i, want_s = search.top_k(q, g, 3)
  with open(out / 'matches.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 * len(query.paths)
  first_rows = [r for r in rows if r['rank'] == '1']
  assert [r['gallery'] for r in first_rows] == [gallery.paths[i] for i in want_i[:, 0]]
  np.testing.assert_allclose([float(r['score']) for r in first_rows], want_s[:, 0], atol=1e-4)
  written = json.load(open(out / 'matches.json'))
  metrics = search.labelled_metrics(q, g, query.identities, gallery.identities)
  assert written['summary']['metrics']['mAP'] == pytest.approx(metrics['mAP'], abs=1e-3)
  assert f'mAP {metrics["mAP"]:.2f}' in first.stdout

  # Again, with a threshold between the best scores: only new work is none, and the
  # queries below it are answered "no match".
  threshold = float(np.median(want_s[:, 0]))
  second = run(*common(folders, model_file, out), '--threshold', str(threshold))
  assert second.returncode == 0, second.stderr[-3000:]
  assert f'(0 embedded, {n} from the cache)' in second.stdout
  with open(out / 'matches.csv') as f:
    rows = list(csv.DictReader(f))
  rejected = {r['query'] for r in rows if r['gallery'] == 'no match'}
  assert rejected == {p for p, s in zip(query.paths, want_s[:, 0]) if s < threshold}
  assert all(r['rank'] == '0' for r in rows if r['gallery'] == 'no match')


def test_search_errors_are_one_line(tmp_path, folders, model_file):
  empty = tmp_path / 'empty'
  empty.mkdir()
  args = common(folders, model_file, tmp_path / 'out')
  args[args.index(str(folders / 'gallery'))] = str(empty)
  result = run(*args)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    f"cal_jax.search: error: --gallery '{empty}' holds no image (.jpg, .jpeg, .png, .bmp, "
    'sub-folders included)'
  )
  swapped = common(folders, model_file, tmp_path / 'out')
  swapped[swapped.index('infrared')] = 'visible'
  swapped[swapped.index('visible', swapped.index('--gallery_modality'))] = 'infrared'
  result = run(*swapped)
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert 'is in colour, but --gallery_modality is infrared' in last or 'is grey' in last, last
  assert 'Traceback' not in result.stderr


def test_query_and_gallery_that_share_images_are_refused(folders):
  from cal_jax.evaluation import gallery_search

  query = str(folders / 'query')
  with pytest.raises(gallery_search.SearchInputError, match='are the same folder'):
    gallery_search.check_disjoint(query, query + '/')
  inner = os.path.join(query, 'a', 'x.png')
  with pytest.raises(gallery_search.SearchInputError, match=r'1 images are both in --query'):
    gallery_search.check_disjoint(query, str(folders), [inner], [inner, str(folders / 'g.png')])
  gallery_search.check_disjoint(query, str(folders / 'gallery'), [inner], [str(folders / 'g.png')])
