"""Tests of the evaluator and the results on a small synthetic SYSU-MM01.

The embedding functions are fakes whose features are known: each looks up
which test image (and which view, plain or mirrored) it was given by nearest
neighbour among pixels computed here with numpy, and returns a feature chosen
for that (image, view). Expected metrics come from `evaluate_ranking` called
on features built here, with query and gallery sets from `build_split`.
"""

import collections
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from reference_rerank import reference_rerank

from cal_jax.data import augment, images
from cal_jax.data.datasets import synthetic
from cal_jax.data.splits import SplitArrays, load_builder_split
from cal_jax.evaluation import embedding as inference
from cal_jax.evaluation import evaluator as evaluate_lib
from cal_jax.evaluation import metrics, protocols
from cal_jax.evaluation import rerank as rerank_lib
from cal_jax.evaluation import results as results_lib
from configs import default

tfds.disable_progress_bar()
pytestmark = pytest.mark.filterwarnings('ignore:gallery of .* is smaller than max_rank')

IMAGE_SIZE = (32, 16)
BATCH = 8
NUM_PARTS = 2
PART_DIM = 3
SYSU_KEYS = ['sysu/all/single', 'sysu/all/multi', 'sysu/indoor/single', 'sysu/indoor/multi']


@pytest.fixture(scope='module')
def split(tmp_path_factory):
  """The test split of an 18-identity synthetic SYSU-MM01 (6 test ids)."""
  base = tmp_path_factory.mktemp('sysu_eval')
  synthetic.generate(
    'sysu',
    str(base / 'manual' / 'SYSU-MM01'),
    num_ids=18,
    seed=0,
    images_per_camera=(1, 3),
    height=48,
  )
  builder = tfds.builder('sysu_mm01', data_dir=str(base / 'tfds'))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(base / 'manual'))
  )
  return load_builder_split(builder, 'test')


@pytest.fixture
def settings():
  config = default.get_config()
  config.data.image_height, config.data.image_width = IMAGE_SIZE
  config.data.eval_batch_size = BATCH
  config.data.eval_flip = True
  config.model.num_parts = NUM_PARTS
  return evaluate_lib.EvalSettings.from_config(config)


def test_settings_of_the_baseline_normalise_the_whole_feature():
  config = default.get_config()
  assert evaluate_lib.EvalSettings.from_config(config).num_parts == config.model.num_parts
  config.model.embedding = 'global'
  assert evaluate_lib.EvalSettings.from_config(config).num_parts == 1


def _as_llcm(split):
  """The same images with LLCM-like cameras (near-infrared 3 -> 7, 6 -> 8)."""
  camera = split.camera.copy()
  camera[(split.modality == 1) & (camera == 3)] = 7
  camera[(split.modality == 1) & (camera == 6)] = 8
  return SplitArrays(split.image, split.id, camera, split.modality, split.path)


class FakeEmbed:
  """embed_fn returning ``table[index, view]`` for the image it is given.

  Attributes:
    table: [N, 2, D] the feature of each test image, plain (0) and mirrored
      (1).
    calls: one list of (index, view) per call, in call order.
  """

  def __init__(self, split, table):
    pixels = images.resize_images(split.image, IMAGE_SIZE)
    plain = ((pixels / np.float32(255) - augment.IMAGENET_MEAN) / augment.IMAGENET_STD).astype(
      np.float32
    )
    views = np.stack([plain, plain[:, :, ::-1]], axis=1)  # [N, 2, H, W, 3]
    self.candidates = views.reshape(-1, plain[0].size)
    self.modality = split.modality
    self.table = np.asarray(table, np.float32)
    self.calls = []

  def __call__(self, images, modality):
    shape = images.shape
    flat = np.asarray(images, np.float32).reshape(-1, self.candidates.shape[1])
    diff = np.abs(flat[:, None] - self.candidates[None]).max(axis=2)
    best = diff.argmin(axis=1)
    assert diff[np.arange(len(best)), best].max() < 1e-4
    index, view = best // 2, best % 2
    assert (self.modality[index] == modality).all()
    self.calls.append(list(zip(index.tolist(), view.tolist())))
    return self.table[index, view].reshape(shape[:-3] + (-1,))


def _random_table(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 2, NUM_PARTS * PART_DIM)).astype(np.float32)


def _numpy_features(table, flip=True):
  """Flip average, then each part L2-normalised, in numpy: [N, D]."""
  f = table.mean(axis=1) if flip else table[:, 0]
  parts = f.reshape(len(f), NUM_PARTS, -1).astype(np.float64)
  parts /= np.linalg.norm(parts, axis=-1, keepdims=True)
  return parts.reshape(len(f), -1)


def _direct(features, split, key, trial):
  """evaluate_ranking on hand-built features: one trial, in percent."""
  table = protocols.RecordTable.from_records(
    [
      collections.namedtuple('R', 'path id camera modality')(*r)
      for r in zip(split.path, split.id, split.camera, split.modality)
    ]
  )
  s = protocols.build_split(table, key, trial)
  features = features.astype(np.float32)
  out = metrics.evaluate_ranking(
    -(features[s.query] @ features[s.gallery].T),
    split.id[s.query],
    split.id[s.gallery],
    split.camera[s.query],
    split.camera[s.gallery],
    protocol=s.metric,
  )
  cmc = out['cmc']
  return {
    'R1': 100 * cmc[0],
    'R5': 100 * cmc[min(5, len(cmc)) - 1],
    'R10': 100 * cmc[min(10, len(cmc)) - 1],
    'R20': 100 * cmc[min(20, len(cmc)) - 1],
    'mAP': 100 * out['mAP'],
    'mINP': 100 * out['mINP'],
    'cmc': 100 * np.asarray(cmc),
  }, s


def test_protocol_keys():
  assert evaluate_lib.protocol_keys('sysu_mm01') == SYSU_KEYS
  assert evaluate_lib.protocol_keys('regdb') == ['regdb/v2t', 'regdb/t2v']
  assert evaluate_lib.protocol_keys('llcm') == ['llcm/v2n', 'llcm/n2v']
  with pytest.raises(ValueError, match='no test protocols'):
    evaluate_lib.protocol_keys('market1501')


@pytest.mark.parametrize('flip,local_devices', [(True, None), (False, None), (True, 2)])
def test_extract_features_flip_and_parts(split, flip, local_devices):
  fake = FakeEmbed(split, _random_table(len(split)))
  visible = np.flatnonzero(split.modality == 0)
  indices = np.random.default_rng(1).permutation(visible)[:11]  # 2 batches
  got = inference.extract_features(
    fake,
    split,
    indices,
    modality=0,
    image_size=IMAGE_SIZE,
    batch_size=BATCH,
    flip=flip,
    num_parts=NUM_PARTS,
    local_devices=local_devices,
  )
  want = _numpy_features(fake.table, flip)[indices]
  assert got.shape == (11, NUM_PARTS * PART_DIM) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert len(fake.calls) == 2 * (2 if flip else 1)
  views = [v for call in fake.calls for _, v in call]
  assert views.count(1) == (views.count(0) if flip else 0)


def test_extract_features_one_modality(split):
  fake = FakeEmbed(split, _random_table(len(split)))
  mixed = [int(np.flatnonzero(split.modality == 0)[0]), int(np.flatnonzero(split.modality == 1)[0])]
  with pytest.raises(ValueError, match='one modality per call'):
    inference.extract_features(
      fake,
      split,
      mixed,
      modality=0,
      image_size=IMAGE_SIZE,
      batch_size=BATCH,
      flip=True,
      num_parts=NUM_PARTS,
    )
  assert not fake.calls


def test_identity_embedding_is_perfect(split, settings):
  ids = np.unique(split.id)
  one_hot = (split.id[:, None] == ids[None]).astype(np.float32)
  table = np.tile(one_hot, (1, NUM_PARTS))[:, None].repeat(2, axis=1)
  out = evaluate_lib.evaluate(
    FakeEmbed(split, table), split, 'sysu_mm01', settings, log=lambda _: None
  ).results
  assert list(out) == SYSU_KEYS
  for key, r in out.items():
    for name in results_lib.METRICS:
      assert r[name] == pytest.approx(100.0), (key, name)
      assert r[name + '_std'] == pytest.approx(0.0), (key, name)
    assert r['trials'] == 10
    assert r['gallery_draw'] == 'random.seed(0) .. random.seed(9)'


@pytest.mark.parametrize('whole', [True, False], ids=['union_matrix', 'probe_chunks'])
@pytest.mark.parametrize('dataset', ['sysu_mm01', 'regdb', 'llcm'])
def test_random_embedding_equals_direct_ranking(split, settings, dataset, whole):
  """Every protocol against `_direct`, with the union distance matrix and (as for a
  gallery too large for it) with each trial's distances computed by probe chunks."""
  data = _as_llcm(split) if dataset == 'llcm' else split
  settings = dataclasses.replace(
    settings, builder_config='trial_3' if dataset == 'regdb' else '', num_trials=3
  )
  fake = FakeEmbed(data, _random_table(len(data), seed=2))
  lines = []
  evaluation = evaluate_lib.evaluate(
    fake,
    data,
    dataset,
    settings,
    log=lines.append,
    union_matrix_bytes=evaluate_lib.UNION_MATRIX_BYTES if whole else 0,
  )
  out = evaluation.results
  assert ('by probe chunks' in ' '.join(lines)) != whole
  timing = evaluation.timing
  assert timing['images'] == len(evaluation.features) and timing['cached_images'] == 0
  assert min(timing['embedding'], timing['distances'], timing['metrics']) > 0
  assert any(line.startswith('evaluation: embedding') for line in lines)
  features = _numpy_features(fake.table)
  trials = 1 if dataset == 'regdb' else 3
  assert list(out) == evaluate_lib.protocol_keys(dataset)
  used = set()
  for key, r in out.items():
    assert r['trials'] == len(r['per_trial']) == trials
    per_trial = []
    for t in range(trials):
      want, s = _direct(features, data, key, t)
      used |= set(s.query.tolist()) | set(s.gallery.tolist())
      got = evaluation.splits[key][t]  # what the pictures read
      np.testing.assert_array_equal(got.gallery, s.gallery)
      np.testing.assert_allclose(
        evaluation.features_of(got.query), features[s.query], rtol=1e-5, atol=1e-6
      )
      per_trial.append(want)
      for name, value in want.items():
        assert r['per_trial'][t][name] == pytest.approx(value, abs=1e-9)
      assert r['per_trial'][t]['cmc'][0] == r['per_trial'][t]['R1']
      assert r['per_trial'][t]['num_gallery'] == len(s.gallery)
    for name in results_lib.METRICS:
      values = [p[name] for p in per_trial]
      assert r[name] == pytest.approx(np.mean(values), abs=1e-9)
      want_std = np.std(values, ddof=1) if trials > 1 else 0.0
      assert r[name + '_std'] == pytest.approx(want_std, abs=1e-9)
    np.testing.assert_allclose(r['cmc'], np.mean([p['cmc'] for p in per_trial], axis=0), atol=1e-9)
    assert any(line.startswith(key) for line in lines)
  if dataset == 'regdb':
    assert out['regdb/v2t']['gallery_draw'] == 'whole test split of trial_3'
    assert out['regdb/t2v']['per_trial'][0]['trial'] == 3

  # Each needed image once per view; the only repeats are the padding of a
  # modality's last batch, which repeats that modality's first image.
  embedded = collections.Counter(iv for call in fake.calls for iv in call)
  assert {i for i, _ in embedded} == used
  for modality in (0, 1):
    n = sum(1 for i in used if data.modality[i] == modality)
    calls = [c for c in fake.calls if data.modality[c[0][0]] == modality]
    assert len(calls) == 2 * -(-n // BATCH)
    repeated = [
      iv for iv, count in embedded.items() if count > 1 and data.modality[iv[0]] == modality
    ]
    assert len({i for i, _ in repeated}) <= 1
    for iv in repeated:
      assert embedded[iv] == 1 + (-n) % BATCH


def test_evaluate_checks_keys(split, settings):
  fake = FakeEmbed(split, _random_table(len(split)))
  with pytest.raises(ValueError, match='does not belong'):
    evaluate_lib.evaluate(fake, split, 'sysu_mm01', settings, keys=['regdb/v2t'])
  with pytest.raises(ValueError, match='only applies to SYSU'):
    evaluate_lib.evaluate(
      fake, split, 'regdb', dataclasses.replace(settings, rand_perm_path='rand_perm_cam.mat')
    )
  visible = split.modality == 0
  only_visible = SplitArrays(
    *(getattr(split, f)[visible] for f in ('image', 'id', 'camera', 'modality', 'path'))
  )
  with pytest.raises(ValueError, match='is empty'):
    evaluate_lib.evaluate(fake, only_visible, 'regdb', settings)
  assert not fake.calls


def _results():
  draws = [f'random.seed({t})' for t in range(3)]
  per_trial = [
    {
      'trial': t,
      'R1': 70.0 + t,
      'R5': 85.0,
      'R10': 90.5 + t,
      'R20': 95.0,
      'mAP': 66.0 - t,
      'mINP': 40.0 + 2 * t,
    }
    for t in range(3)
  ]
  single = dict(per_trial[0], R1=94.51, mAP=88.67)
  return {
    'sysu/all/single': results_lib.summarize(per_trial, draws),
    'regdb/v2t': results_lib.summarize([single], ['whole test split']),
  }


def test_write_results_atomic_and_readable(tmp_path, monkeypatch):
  results = _results()
  path = str(tmp_path / 'out' / 'results.json')
  meta = {'checkpoint_step': np.int64(1200), 'dataset': 'sysu_mm01'}
  results_lib.write_results(path, results, meta)
  with open(path) as f:
    raw = json.load(f)
  assert raw['meta']['checkpoint_step'] == 1200
  assert raw['meta']['gallery_draw']['sysu/all/single'] == ('random.seed(0) .. random.seed(2)')
  assert 'date' in raw['meta']
  got, got_meta = results_lib.read_results(path)
  assert got == results and got_meta['dataset'] == 'sysu_mm01'

  # A failure before the rename leaves the old file whole and no debris.
  def fail(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', fail)
  with pytest.raises(OSError, match='disk full'):
    results_lib.write_results(path, {}, meta)
  monkeypatch.undo()
  assert results_lib.read_results(path)[0] == results
  assert os.listdir(tmp_path / 'out') == ['results.json']
  with pytest.raises(ValueError, match='checkpoint_step'):
    results_lib.write_results(path, results, {'dataset': 'sysu_mm01'})


def test_results_of_one_step_never_replace_a_newer_step_s(tmp_path):
  """eval_results.json keeps the newest evaluated step's results; an older step (a fall
  back past a damaged step, or --checkpoint) goes to eval_results_step<N>.json."""
  workdir = str(tmp_path)
  main = os.path.join(workdir, 'eval_results.json')
  assert results_lib.results_path(workdir, 8) == main  # none yet
  results_lib.write_results(main, _results(), {'checkpoint_step': 8, 'dataset': 'sysu_mm01'})
  assert results_lib.results_path(workdir, 8) == main  # the same step, evaluated again
  assert results_lib.results_path(workdir, 12) == main  # a newer step
  older = results_lib.results_path(workdir, 4)
  assert older == os.path.join(workdir, 'eval_results_step4.json')
  results_lib.write_results(older, {}, {'checkpoint_step': 4, 'dataset': 'sysu_mm01'})
  assert results_lib.read_results(main)[1]['checkpoint_step'] == 8
  # A file that cannot be read is not replaced either.
  with open(main, 'w') as f:
    f.write('{"meta": ')
  assert results_lib.results_path(workdir, 12) == os.path.join(workdir, 'eval_results_step12.json')


def test_format_table():
  """The paper's layout: a table per data set, a column group per mode."""
  results = _results()
  results['sysu/indoor/multi'] = results_lib.summarize(
    [dict(t, R1=t['R1'] + 10) for t in results['sysu/all/single']['per_trial']],
    ['random.seed(0)'] * 3,
  )
  expected = """\
SYSU-MM01 (as the paper's Table 1)
      all-search single-shot, 3 trials         indoor-search multi-shot, 3 trials
           R1     R10     R20     mAP    mINP       R1     R10     R20     mAP    mINP
mean    71.00   91.50   95.00   65.00   42.00    81.00   91.50   95.00   65.00   42.00
std      1.00    1.00    0.00    1.00    2.00     1.00    1.00    0.00    1.00    2.00

RegDB (as the paper's Table 2)
      visible to infrared, 1 trial
           R1     R10     R20     mAP    mINP
mean    94.51   90.50   95.00   88.67   40.00
std         -       -       -       -       -"""
  assert results_lib.format_table(results) == expected
  # The order of the paper, whatever the order of the results.
  assert results_lib.format_table(dict(reversed(results.items()))) == expected


def test_combine_runs():
  runs = [
    {
      'regdb/v2t': results_lib.summarize(
        [{'R1': r1, 'R5': 0, 'R10': 0, 'R20': 0, 'mAP': r1 - 5, 'mINP': 0}],
        [f'whole test split of trial_{t}'],
      )
    }
    for t, r1 in ((1, 90.0), (2, 94.0))
  ]
  out = results_lib.combine_runs(runs)['regdb/v2t']
  assert out['trials'] == 2 and out['R1'] == 92.0 and out['mAP'] == 87.0
  assert out['R1_std'] == pytest.approx(np.std([90, 94], ddof=1))
  assert 'trial_1' in out['gallery_draw'] and 'trial_2' in out['gallery_draw']


def test_rerank_scores_each_trial_on_its_own_reranked_distances(split, settings):
  """config.eval.rerank: each trial's distances are the reference loops' re-ranking of
  that trial's Euclidean distances (tests/evaluation/test_rerank.py), then scored."""
  rerank = rerank_lib.RerankSettings(k1=4, k2=2, lambda_value=0.3)
  settings = dataclasses.replace(settings, num_trials=2, rerank=rerank)
  fake = FakeEmbed(split, _random_table(len(split), seed=3))
  key = 'sysu/all/single'
  out = evaluate_lib.evaluate(fake, split, 'sysu_mm01', settings, keys=[key], log=lambda _: 0)
  features = _numpy_features(fake.table).astype(np.float32)
  table = protocols.RecordTable.of_columns(split)
  result = out.results[key]
  assert result['rerank'] == 'k-reciprocal (k1=4, k2=2, lambda=0.3)'
  for t in range(2):
    s = protocols.build_split(table, key, t)
    q, g = features[s.query], features[s.gallery]
    dist = lambda a, b: np.sqrt(np.maximum(((a[:, None] - b[None]) ** 2).sum(-1), 0))
    want = metrics.evaluate_ranking(
      reference_rerank(dist(q, g), dist(q, q), dist(g, g), 4, 2, 0.3),
      split.id[s.query],
      split.id[s.gallery],
      split.camera[s.query],
      split.camera[s.gallery],
      protocol=s.metric,
    )
    assert result['per_trial'][t]['mAP'] == pytest.approx(100 * want['mAP'], abs=1e-4)
    assert result['per_trial'][t]['R1'] == pytest.approx(100 * want['cmc'][0], abs=1e-4)
  plain, _ = _direct(features, split, key, 0)
  assert result['per_trial'][0]['mAP'] != pytest.approx(plain['mAP'], abs=1e-6)
  assert 're-ranked: k-reciprocal (k1=4, k2=2, lambda=0.3)' in results_lib.format_table(out.results)


def test_rerank_settings_from_config():
  config = default.get_config()
  assert evaluate_lib.EvalSettings.from_config(config).rerank is None
  config.eval.rerank = True
  config.eval.rerank_k1 = 10
  got = evaluate_lib.EvalSettings.from_config(config).rerank
  assert (got.k1, got.k2, got.lambda_value) == (10, 6, 0.3)


def test_feature_cache_reembeds_nothing_for_other_protocols_and_trials(split, settings, tmp_path):
  """WORKDIR/eval_features.npz: a second evaluation with other keys and trial counts
  embeds nothing and scores the same; an image the file lacks is embedded alone; another
  key (e.g. another flip) replaces the file."""
  from cal_jax.evaluation.feature_cache import FILENAME, FeatureCache

  table = _random_table(len(split), seed=4)
  first = FakeEmbed(split, table)
  quiet = dict(log=lambda _: None)
  one = dataclasses.replace(settings, num_trials=2)
  cache = FeatureCache(str(tmp_path), 'key-a')
  reference = evaluate_lib.evaluate(
    first, split, 'sysu_mm01', one, keys=['sysu/all/single'], cache=cache, **quiet
  )
  assert first.calls and os.path.isfile(tmp_path / FILENAME)
  # Every protocol and three trials: the indoor and multi-shot galleries need images the
  # single-shot draws of trials 0-1 did not pick, and only those are embedded.
  second = FakeEmbed(split, table)
  again = evaluate_lib.evaluate(
    second,
    split,
    'sysu_mm01',
    dataclasses.replace(settings, num_trials=3),
    cache=FeatureCache(str(tmp_path), 'key-a'),
    **quiet,
  )
  cached = set(np.flatnonzero(reference.row_of >= 0).tolist())
  embedded_again = {i for call in second.calls for i, _ in call}
  assert embedded_again and not embedded_again & cached
  uncached = evaluate_lib.evaluate(
    FakeEmbed(split, table),
    split,
    'sysu_mm01',
    dataclasses.replace(settings, num_trials=3),
    **quiet,
  )
  for key, result in uncached.results.items():
    for name in results_lib.METRICS:
      assert again.results[key][name] == pytest.approx(result[name], abs=1e-9), (key, name)
  # Now everything is in the file: a third evaluation embeds nothing at all.
  third = FakeEmbed(split, table)
  evaluate_lib.evaluate(
    third, split, 'sysu_mm01', one, cache=FeatureCache(str(tmp_path), 'key-a'), **quiet
  )
  assert not third.calls
  # Another key: the file's features are not used, and the file is replaced.
  fourth = FakeEmbed(split, table)
  evaluate_lib.evaluate(
    fourth, split, 'sysu_mm01', one, cache=FeatureCache(str(tmp_path), 'key-b'), **quiet
  )
  assert fourth.calls
  with np.load(tmp_path / FILENAME) as saved:
    assert str(saved['key']) == 'key-b'


def test_cache_key_changes_with_step_weights_flip_and_dtype(tiny_config, tiny_state):
  import jax.numpy as jnp
  from conftest import NUM_CLASSES

  from cal_jax.evaluation.feature_cache import cache_key
  from cal_jax.training.state import build_model

  model = build_model(tiny_config, NUM_CLASSES)
  variables = {'params': tiny_state.params, 'batch_stats': tiny_state.batch_stats}
  s = evaluate_lib.EvalSettings.from_config(tiny_config)
  fake_split = _Columns(np.arange(3), np.ones(3), np.zeros(3))
  m_hat = np.arange(4)
  base = cache_key(model, variables, m_hat, 'parts', s, 8, fake_split)
  assert base == cache_key(model, variables, m_hat, 'parts', s, 8, fake_split)
  moved = jax_tree_add(variables, 1e-3)
  changed = [
    cache_key(model, variables, m_hat, 'parts', s, 9, fake_split),
    cache_key(model, moved, m_hat, 'parts', s, 8, fake_split),
    cache_key(
      model, variables, m_hat, 'parts', dataclasses.replace(s, flip=not s.flip), 8, fake_split
    ),
    cache_key(model.clone(dtype=jnp.bfloat16), variables, m_hat, 'parts', s, 8, fake_split),
    cache_key(model, variables, m_hat[::-1], 'parts', s, 8, fake_split),
  ]
  assert len({base, *changed}) == 1 + len(changed)
  other_split = _Columns(np.arange(3), np.array([1, 1, 2]), np.zeros(3))
  assert cache_key(model, variables, m_hat, 'parts', s, 8, other_split) != base


@dataclasses.dataclass
class _Columns:
  """What the cache key reads of a test split."""

  id: np.ndarray
  camera: np.ndarray
  modality: np.ndarray

  def __len__(self):
    return len(self.id)


def jax_tree_add(tree, value):
  import jax

  return jax.tree_util.tree_map(lambda x: np.asarray(x) + value, tree)
