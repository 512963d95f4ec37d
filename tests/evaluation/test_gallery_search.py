"""The search's pieces against plain numpy: top-k, labelled metrics, the cache, the folders."""

import os

import numpy as np
import pytest
from PIL import Image

from cal_jax.evaluation import gallery_search as search
from cal_jax.evaluation import metrics


def unit(rng, n, d=12):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_top_k_equals_a_full_sort_over_chunks():
  rng = np.random.default_rng(0)
  q, g = unit(rng, 23), unit(rng, 101)
  g[7] = g[3]  # a tie: the lower index first
  indices, scores = search.top_k(q, g, 5, chunk=4, gallery_chunk=17)
  full = q @ g.T
  want = np.argsort(-full, axis=1, kind='stable')[:, :5]
  np.testing.assert_array_equal(indices, want)
  np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), rtol=1e-6)
  assert search.top_k(q, g[:3], 5)[0].shape == (23, 3)  # k clipped to the gallery


def test_labelled_metrics_equal_one_full_ranking():
  rng = np.random.default_rng(1)
  q, g = unit(rng, 30), unit(rng, 50)
  q_ids = [f'id{i}' for i in rng.integers(0, 8, 30)]
  g_ids = [f'id{i}' for i in rng.integers(0, 10, 50)]
  got = search.labelled_metrics(q, g, q_ids, g_ids, chunk=7)
  names = sorted(set(q_ids) | set(g_ids))
  want = metrics.evaluate_ranking(
    -(q @ g.T),
    np.array([names.index(i) for i in q_ids]),
    np.array([names.index(i) for i in g_ids]),
    protocol='regdb',
    max_rank=10,
  )
  assert got['R1'] == pytest.approx(100 * want['cmc'][0])
  assert got['R10'] == pytest.approx(100 * want['cmc'][9])
  assert got['mAP'] == pytest.approx(100 * want['mAP'])
  assert got['mINP'] == pytest.approx(100 * want['mINP'])
  assert got['num_valid_queries'] == want['num_valid_queries']


def test_feature_cache_round_trip_and_model_key(tmp_path):
  path = str(tmp_path / 'features.npz')
  cache = search.FeatureCache(path, 'model-a')
  key = search.FeatureCache.key(b'bytes', 1)
  cache.features[key] = np.arange(4, dtype=np.float32)
  cache.save()
  again = search.FeatureCache(path, 'model-a')
  np.testing.assert_array_equal(again.features[key], np.arange(4))
  assert search.FeatureCache(path, 'model-b').features == {}  # another model: nothing reused
  assert key != search.FeatureCache.key(b'bytes', 0)  # the modality is part of the key


def save(path, pixels):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


def grey(value=100):
  return np.full((16, 8, 3), value)


def colour():
  image = grey()
  image[..., 0] = 220
  return image


def test_read_folder_identities_and_modalities(tmp_path):
  save(tmp_path / 'q' / 'alice' / 'a.png', grey())
  save(tmp_path / 'q' / 'bob' / 'b.png', grey(50))
  images = search.read_folder(str(tmp_path / 'q'), 'infrared', 'query')
  assert images.identities == ['alice', 'bob'] and images.modality == search.INFRARED
  save(tmp_path / 'flat' / 'x.png', colour())
  save(tmp_path / 'flat' / 'y.png', grey())
  flat = search.read_folder(str(tmp_path / 'flat'), 'visible', 'gallery')
  assert flat.identities is None and len(flat.paths) == 2


def test_bad_folders_are_named(tmp_path):
  with pytest.raises(search.SearchInputError, match='is not a folder'):
    search.read_folder(str(tmp_path / 'missing'), 'visible', 'gallery')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(search.SearchInputError, match="--query .*empty' holds no image"):
    search.read_folder(str(tmp_path / 'empty'), 'visible', 'query')
  save(tmp_path / 'bad' / 'ok.png', colour())
  (tmp_path / 'bad' / 'broken.jpg').write_bytes(b'not an image')
  with pytest.raises(search.SearchInputError, match="broken.jpg' cannot be decoded"):
    search.read_folder(str(tmp_path / 'bad'), 'visible', 'gallery')
  save(tmp_path / 'ir' / 'a.png', grey())
  save(tmp_path / 'ir' / 'b.png', colour())
  with pytest.raises(search.SearchInputError, match="b.png' is in colour, but --query_modality"):
    search.read_folder(str(tmp_path / 'ir'), 'infrared', 'query')
  with pytest.raises(search.SearchInputError, match='every gallery image .* is grey'):
    save(tmp_path / 'vis' / 'a.png', grey())
    search.read_folder(str(tmp_path / 'vis'), 'visible', 'gallery')
