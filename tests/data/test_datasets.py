"""Tests of cal_jax.data.datasets: synthetic trees read by the real tfds builders.

Expected counts are worked out here by walking the written tree and reading
its index files, not taken from the generator or from `records`.
"""

import collections
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cal_jax.data import splits
from cal_jax.data.datasets import records, synthetic

tfds.disable_progress_bar()

SMALL = dict(num_ids=9, images_per_camera=(1, 3))


def _ids_of_line(path):
  with open(path) as f:
    return {int(x) for x in f.read().strip().split(',')}


def _index_lines(root, rel):
  with open(os.path.join(root, rel)) as f:
    return [line.split() for line in f if line.strip()]


def _build(name, manual_dir, data_dir):
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  return builder


def _examples(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


def _counts(examples):
  return collections.Counter((int(e['modality']), int(e['camera'])) for e in examples)


def _check_examples(examples, root, expected_counts):
  """Counts per (modality, camera), order, ids and pixels of `examples`."""
  assert _counts(examples) == expected_counts
  keys = [(int(e['id']), int(e['camera']), e['path'].decode()) for e in examples]
  assert keys == sorted(keys)
  for e in examples[:: max(1, len(examples) // 7)]:
    path = e['path'].decode()
    assert not os.path.isabs(path) and '\\' not in path
    assert e['image'].dtype == np.uint8 and e['image'].shape[2] == 3
    assert e['id'].dtype == np.int32
    want = np.asarray(Image.open(os.path.join(root, path)).convert('RGB'))
    assert e['image'].shape == want.shape
    # TensorFlow's and PIL's JPEG decoders differ by a grey level or so.
    assert np.abs(e['image'].astype(int) - want).mean() < 3.0


@pytest.fixture(scope='module')
def sysu(tmp_path_factory):
  """A small SYSU-MM01 tree inside a manual folder, and its prepared builder."""
  base = tmp_path_factory.mktemp('sysu')
  root = base / 'manual' / 'SYSU-MM01'
  synthetic.generate('sysu', str(root), seed=3, **SMALL)
  # manual_dir is the folder above: the builder finds SYSU-MM01/ in it.
  builder = _build('sysu_mm01', base / 'manual', base / 'tfds')
  return root, builder


def test_sysu_builder_counts(sysu):
  root, builder = sysu
  train_ids = _ids_of_line(root / 'exp' / 'train_id.txt') | _ids_of_line(
    root / 'exp' / 'val_id.txt'
  )
  test_ids = _ids_of_line(root / 'exp' / 'test_id.txt')
  assert not train_ids & test_ids
  expected = {'train': collections.Counter(), 'test': collections.Counter()}
  for cam in range(1, 7):
    for pid_dir in os.listdir(root / f'cam{cam}'):
      split = 'train' if int(pid_dir) in train_ids else 'test'
      n = len(os.listdir(root / f'cam{cam}' / pid_dir))
      expected[split][(int(cam in (3, 6)), cam)] += n
  for split in ('train', 'test'):
    examples = _examples(builder, split)
    _check_examples(examples, root, expected[split])
    assert {int(e['id']) for e in examples} == (train_ids if split == 'train' else test_ids)
    num_examples = builder.info.splits[split].num_examples
    assert num_examples == sum(expected[split].values())
  # JPEGs are stored as their own bytes, not re-encoded.
  raw = builder.as_dataset(split='test', decoders={'image': tfds.decode.SkipDecoding()})
  for e in tfds.as_numpy(raw.take(3)):
    assert e['image'] == (root / e['path'].decode()).read_bytes()
  # The evaluation code's listing is the builder's, in the same order.
  listed = records.list_records('sysu', str(root), 'test')
  assert [r.path for r in listed] == [e['path'].decode() for e in _examples(builder, 'test')]


def test_sysu_some_identities_miss_some_cameras(sysu):
  root, _ = sysu
  ids = set(os.listdir(root / 'cam1')) | set(os.listdir(root / 'cam4'))
  present = [sum((root / f'cam{c}' / i).is_dir() for c in range(1, 7)) for i in ids]
  assert min(present) < 6


def test_prepared_data_is_reused(sysu, tmp_path):
  root, builder = sysu
  victim = next((root / 'cam1').rglob('*.jpg'))
  saved = victim.read_bytes()
  victim.write_bytes(b'not an image')  # would fail if prepared again
  try:
    again = _build('sysu_mm01', root.parent, builder.data_dir_root)
    assert again.info.splits['train'].num_examples == (builder.info.splits['train'].num_examples)
  finally:
    victim.write_bytes(saved)


def test_regdb_builder_counts(tmp_path):
  root = tmp_path / 'RegDB'
  synthetic.generate('regdb', str(root), num_ids=6, seed=1)
  # An 8-bit grayscale thermal image must come out as 3 equal channels.
  grey = _index_lines(root, 'idx/test_thermal_2.txt')[0][0]
  Image.open(root / grey).convert('L').save(root / grey, format='BMP')
  builder = _build('regdb/trial_2', root, tmp_path / 'tfds')
  for split in ('train', 'test'):
    expected = collections.Counter()
    ids = set()
    for kind, camera, modality in (('visible', 1, 0), ('thermal', 2, 1)):
      lines = _index_lines(root, f'idx/{split}_{kind}_2.txt')
      expected[(modality, camera)] += len(lines)
      ids |= {int(path.split('/')[1]) for path, _ in lines}
    examples = _examples(builder, split)
    _check_examples(examples, root, expected)
    assert {int(e['id']) for e in examples} == ids
  thermal = next(e for e in examples if e['path'].decode() == grey)
  assert Image.open(root / grey).mode == 'L'
  assert np.array_equal(thermal['image'][..., 0], thermal['image'][..., 2])
  assert np.array_equal(thermal['image'][..., 0], np.asarray(Image.open(root / grey)))
  # Trials are different splits of the same identities.
  t1, t2 = (
    {r.id for r in records.list_records('regdb', str(root), 'train', trial=t)} for t in (1, 2)
  )
  assert t1 != t2 and len(t1) == len(t2) == 3


def test_llcm_builder_counts(tmp_path):
  root = tmp_path / 'LLCM'
  synthetic.generate('llcm', str(root), seed=2, **SMALL)
  builder = _build('llcm', root, tmp_path / 'tfds')
  expected = collections.Counter()
  for kind, modality in (('vis', 0), ('nir', 1)):
    for path, _ in _index_lines(root, f'idx/train_{kind}.txt'):
      camera = int(re.search(r'_c(\d+)_', path)[1])
      expected[(modality, camera)] += 1
  _check_examples(_examples(builder, 'train'), root, expected)
  test_ids = _ids_of_line(root / 'idx' / 'test_id.txt')
  expected = collections.Counter()
  for kind, modality in (('vis', 0), ('nir', 1)):
    for cam_dir in os.listdir(root / f'test_{kind}'):
      for pid_dir in os.listdir(root / f'test_{kind}' / cam_dir):
        assert int(pid_dir) in test_ids
        n = len(os.listdir(root / f'test_{kind}' / cam_dir / pid_dir))
        expected[(modality, int(cam_dir[3:]))] += n
  test = _examples(builder, 'test')
  _check_examples(test, root, expected)
  assert {int(e['id']) for e in test} == test_ids
  assert (1, 3) not in expected  # LLCM has no near-infrared cam3


def test_corrupt_image_is_named(tmp_path):
  root = tmp_path / 'SYSU-MM01'
  synthetic.generate('sysu', str(root), seed=0, **SMALL)
  victim = records.list_records('sysu', str(root), 'test')[1].path
  data = (root / victim).read_bytes()
  (root / victim).write_bytes(data[: len(data) // 3])  # truncated JPEG
  with pytest.raises(Exception, match=re.escape(victim)):
    _build('sysu_mm01', root, tmp_path / 'tfds')


def test_missing_camera_folder_is_a_layout_error(tmp_path):
  root = tmp_path / 'SYSU-MM01'
  synthetic.generate('sysu', str(root), seed=0, **SMALL)
  shutil.rmtree(root / 'cam3')
  with pytest.raises(records.DatasetLayoutError) as info:
    records.list_records('sysu', str(root), 'train')
  message = str(info.value)
  assert 'missing cam3/' in message
  assert re.search(r'expected: cam1/, cam2/, cam3/', message)
  assert re.search(r'found: +cam1/, cam2/, cam4/', message)
  assert 'to do:' in message
  assert isinstance(info.value, ValueError)
  with pytest.raises(records.DatasetLayoutError, match='missing cam3/'):
    _build('sysu_mm01', root, tmp_path / 'tfds')


def test_partial_copies_are_layout_errors(tmp_path):
  root = tmp_path / 'RegDB'
  synthetic.generate('regdb', str(root), num_ids=6, seed=0)
  path = _index_lines(root, 'idx/test_thermal_4.txt')[5][0]
  os.remove(root / path)
  with pytest.raises(records.DatasetLayoutError, match=re.escape(path)):
    records.list_records('regdb', str(root), 'test', trial=4)

  root = tmp_path / 'LLCM'
  synthetic.generate('llcm', str(root), seed=0, **SMALL)
  shutil.rmtree(root / 'test_nir' / 'cam7')
  with pytest.raises(records.DatasetLayoutError, match='missing test_nir/cam7/'):
    records.list_records('llcm', str(root), 'train')

  root = tmp_path / 'SYSU-MM01'
  synthetic.generate('sysu', str(root), seed=0, **SMALL)
  test_ids = _ids_of_line(root / 'exp' / 'test_id.txt')
  folder = next(p for p in sorted((root / 'cam1').iterdir()) if int(p.name) in test_ids)
  for f in folder.iterdir():
    f.unlink()
  with pytest.raises(records.DatasetLayoutError, match=re.escape(f'empty: cam1/{folder.name}/')):
    records.list_records('sysu', str(root), 'test')


def test_absent_or_empty_folder_is_a_layout_error(tmp_path):
  with pytest.raises(records.DatasetLayoutError, match='does not exist'):
    records.list_records('llcm', str(tmp_path / 'nowhere'), 'test')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(records.DatasetLayoutError, match='it is empty'):
    records.list_records('regdb', str(tmp_path / 'empty'), 'train', trial=1)
  with pytest.raises(records.DatasetLayoutError, match='expected'):
    _build('llcm', tmp_path / 'empty', tmp_path / 'tfds')


def _tree(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('layout', ['sysu', 'regdb', 'llcm'])
def test_generator_is_deterministic(tmp_path, layout):
  kwargs = dict(num_ids=6, images_per_camera=(1, 2))
  for name, seed in (('a', 5), ('b', 5), ('c', 6)):
    synthetic.generate(layout, str(tmp_path / name), seed=seed, **kwargs)
  a, b, c = (_tree(tmp_path / n) for n in 'abc')
  assert a == b
  assert a != c


def test_synthetic_images_vary_and_infrared_has_no_hue(sysu):
  root, _ = sysu
  recs = records.list_records('sysu', str(root), 'train')
  by_group = collections.defaultdict(list)
  for r in recs:
    by_group[(r.id, r.camera)].append(r)
  group = next(g for g in by_group.values() if len(g) >= 2)
  first, second = (np.asarray(Image.open(root / r.path)) for r in group[:2])
  assert first.shape != second.shape or np.abs(first.astype(int) - second).mean() > 5
  ir = np.asarray(Image.open(root / next(r for r in recs if r.modality).path), dtype=int)
  visible = np.asarray(Image.open(root / recs[0].path), dtype=int)
  assert np.abs(ir[..., 0] - ir[..., 1]).mean() < 2  # JPEG noise only
  assert np.abs(visible[..., 0] - visible[..., 1]).mean() > 5


def test_cli_writes_a_tree(tmp_path, capsys):
  synthetic.main(
    [
      '--layout',
      'llcm',
      '--output',
      str(tmp_path / 'LLCM'),
      '--num-ids',
      '6',
      '--seed',
      '4',
      '--max-images',
      '2',
    ]
  )
  assert 'llcm:' in capsys.readouterr().out
  assert len(records.list_records('llcm', str(tmp_path / 'LLCM'), 'test')) > 0
  with pytest.raises(FileExistsError):
    synthetic.generate('llcm', str(tmp_path / 'LLCM'), num_ids=6)


def test_infrared_gap_changes_only_the_infrared_images(tmp_path):
  """infrared_gap=0 renders near-infrared as the colours' luminance: the visible
  images stay byte-identical, the infrared ones change, and the gap is checked."""
  hard = synthetic.generate('sysu', str(tmp_path / 'hard'), num_ids=9, seed=3, height=48)
  easy = synthetic.generate(
    'sysu', str(tmp_path / 'easy'), num_ids=9, seed=3, height=48, infrared_gap=0.0
  )
  assert hard.num_images == easy.num_images
  changed = collections.Counter()
  for cam in range(1, 7):
    for dirpath, _, files in os.walk(tmp_path / 'hard' / f'cam{cam}'):
      for name in files:
        a = os.path.join(dirpath, name)
        b = a.replace(str(tmp_path / 'hard'), str(tmp_path / 'easy'))
        same = open(a, 'rb').read() == open(b, 'rb').read()
        changed[cam in (3, 6), same] += 1
  assert changed[False, False] == 0 and changed[False, True] > 0  # visible: identical
  assert changed[True, False] > 0  # infrared: re-rendered
  with pytest.raises(ValueError, match='infrared_gap must be in'):
    synthetic.generate('sysu', str(tmp_path / 'bad'), num_ids=9, infrared_gap=1.5)
  with pytest.raises(ValueError, match='sysu layout only'):
    synthetic.generate('regdb', str(tmp_path / 'bad2'), num_ids=9, infrared_gap=0.5)


def _id_list(root, name):
  text = open(os.path.join(root, 'exp', f'{name}_id.txt')).read().strip()
  return [int(i) for i in text.split(',')]


def test_num_test_ids_sets_the_sysu_split(tmp_path):
  """num_test_ids=12 of 18 writes 12 test identities, and every other identity in
  the training or validation list (none in two); 0 keeps a third; other layouts
  and out-of-range counts are refused."""
  root = tmp_path / 'set'
  summary = synthetic.generate('sysu', str(root), num_ids=18, seed=1, height=48, num_test_ids=12)
  test, train, val = (_id_list(root, n) for n in ('test', 'train', 'val'))
  assert len(test) == 12 and len(train) + len(val) == 6
  assert not set(test) & set(train + val) and len(set(test + train + val)) == 18
  assert sorted(summary.test_ids) == sorted(test)
  synthetic.generate('sysu', str(tmp_path / 'third'), num_ids=18, seed=1, height=48)
  assert len(_id_list(tmp_path / 'third', 'test')) == 6
  with pytest.raises(
    ValueError, match=re.escape('num_test_ids must be in [2, num_ids - 4] = [2, 14]')
  ):
    synthetic.generate('sysu', str(tmp_path / 'bad'), num_ids=18, num_test_ids=15)
  with pytest.raises(ValueError, match='num_test_ids is implemented for the sysu layout only'):
    synthetic.generate('regdb', str(tmp_path / 'bad2'), num_ids=8, num_test_ids=4)


def test_synthetic_seed_fixes_the_data_set_across_run_seeds():
  """data.synthetic_seed=-1 draws the identities with config.seed; any other value
  draws the same set whatever config.seed is."""
  config = ml_collections.ConfigDict({'seed': 7, 'data': {'synthetic_seed': -1}})
  assert splits.synthetic_seed(config) == 7
  config.data.synthetic_seed = 0
  assert splits.synthetic_seed(config) == 0
  config.seed = 3
  assert splits.synthetic_seed(config) == 0


# ------------------------------------------------- id files and identity folders ---


@pytest.fixture(scope='module')
def small_trees(tmp_path_factory):
  """One small tree per layout, generated once; copy before changing it."""
  base = tmp_path_factory.mktemp('small_trees')
  trees = {}
  for layout, name in (('sysu', 'SYSU-MM01'), ('regdb', 'RegDB'), ('llcm', 'LLCM')):
    trees[layout] = base / name
    extra = {} if layout == 'regdb' else SMALL
    synthetic.generate(
      layout, str(trees[layout]), seed=4, **({'num_ids': 6} if layout == 'regdb' else extra)
    )
  return trees


def _copy(trees, layout, tmp_path):
  root = tmp_path / trees[layout].name
  shutil.copytree(trees[layout], root)
  return root


def _listing(layout, root, split, trial=None):
  return [
    (r.id, r.camera, r.modality, r.path.rsplit('/', 1)[-1])
    for r in records.list_records(layout, str(root), split, trial=trial)
  ]


@pytest.mark.parametrize(
  'form',
  [
    'one per line',
    'windows line ends',
    'byte-order mark',
    'trailing comma and spaces',
    'last line without newline',
  ],
)
def test_id_files_in_every_form_are_read_whole(small_trees, tmp_path, form):
  root = _copy(small_trees, 'sysu', tmp_path)
  before = {s: _listing('sysu', root, s) for s in ('train', 'test')}
  for name in ('train_id', 'val_id', 'test_id'):
    ids = sorted(_ids_of_line(root / 'exp' / f'{name}.txt'))
    text = {
      'one per line': '\n'.join(map(str, ids)) + '\n',
      'windows line ends': '\r\n'.join(map(str, ids)) + '\r\n',
      'byte-order mark': '\ufeff' + ','.join(map(str, ids)),
      'trailing comma and spaces': ', '.join(map(str, ids)) + ',\n',
      'last line without newline': '\n'.join(f'{i:04d}' for i in ids),
    }[form]
    (root / 'exp' / f'{name}.txt').write_bytes(text.encode('utf-8'))
  for split in ('train', 'test'):
    assert _listing('sysu', root, split) == before[split]
  # LLCM's idx/test_id.txt is read the same way.
  root = _copy(small_trees, 'llcm', tmp_path)
  before = _listing('llcm', root, 'test')
  ids = sorted(_ids_of_line(root / 'idx' / 'test_id.txt'))
  (root / 'idx' / 'test_id.txt').write_text('\n'.join(map(str, ids)) + '\n')
  assert _listing('llcm', root, 'test') == before


def test_id_file_with_something_else_is_refused(small_trees, tmp_path):
  root = _copy(small_trees, 'sysu', tmp_path)
  path = root / 'exp' / 'test_id.txt'
  path.write_text(path.read_text().strip() + ',12a,x\n')
  with pytest.raises(
    records.DatasetLayoutError,
    match=r'exp/test_id.txt holds entries that are not identity numbers'
    r"[\s\S]*found: +'12a', 'x'",
  ):
    records.list_records('sysu', str(root), 'test')


def test_identity_folder_without_zero_padding_is_read(small_trees, tmp_path):
  root = _copy(small_trees, 'sysu', tmp_path)
  before = _listing('sysu', root, 'train')
  folder = sorted(p for p in (root / 'cam1').iterdir())[0]
  short = folder.parent / str(int(folder.name))
  assert short.name != folder.name
  folder.rename(short)
  listed = records.list_records('sysu', str(root), 'train')
  assert [(r.id, r.camera, r.modality, r.path.rsplit('/', 1)[-1]) for r in listed] == before
  assert any(r.path.startswith(f'cam1/{short.name}/') for r in listed)


def test_two_folders_of_one_identity_or_a_strange_folder_are_refused(small_trees, tmp_path):
  root = _copy(small_trees, 'sysu', tmp_path)
  folder = sorted(p for p in (root / 'cam2').iterdir())[0]
  short = str(int(folder.name))
  shutil.copytree(folder, folder.parent / short)
  with pytest.raises(
    records.DatasetLayoutError,
    match=re.escape(f'two folders of one identity: cam2/{folder.name}/ and cam2/{short}/'),
  ):
    records.list_records('sysu', str(root), 'train')
  shutil.rmtree(folder.parent / short)
  (root / 'cam4' / 'backup_0001').mkdir()
  (root / 'cam4' / '.cache').mkdir()  # hidden: ignored
  with pytest.raises(
    records.DatasetLayoutError, match=re.escape('not an identity number: cam4/backup_0001/')
  ):
    records.list_records('sysu', str(root), 'test')


def test_identities_in_training_and_test_lists_are_refused(small_trees, tmp_path):
  root = _copy(small_trees, 'sysu', tmp_path)
  test_ids = sorted(_ids_of_line(root / 'exp' / 'test_id.txt'))
  train = root / 'exp' / 'val_id.txt'
  train.write_text(train.read_text().strip() + f',{test_ids[0]},{test_ids[-1]}')
  for split in ('train', 'test'):  # either split: the lists are wrong
    with pytest.raises(
      records.DatasetLayoutError,
      match=re.escape(
        f'2 ids in both exp/val_id.txt and exp/test_id.txt: {test_ids[0]}, {test_ids[-1]}'
      ),
    ):
      records.list_records('sysu', str(root), split)

  root = _copy(small_trees, 'regdb', tmp_path)
  test_line = (root / 'idx' / 'test_thermal_3.txt').read_text().splitlines()[0]
  with open(root / 'idx' / 'train_thermal_3.txt', 'a') as f:
    f.write(test_line + '\n')
  test_id = int(test_line.split()[0].split('/')[1])
  with pytest.raises(
    records.DatasetLayoutError,
    match=re.escape(f'1 ids in both idx/train_thermal_3.txt and idx/test_thermal_3.txt: {test_id}'),
  ):
    records.list_records('regdb', str(root), 'train', trial=3)
  records.list_records('regdb', str(root), 'train', trial=4)  # other trials are fine

  root = _copy(small_trees, 'llcm', tmp_path)
  test_image = records.list_records('llcm', str(root), 'test')[0]
  with open(root / 'idx' / 'train_vis.txt', 'a') as f:
    f.write(f'{test_image.path} 0\n')
  with pytest.raises(
    records.DatasetLayoutError,
    match=re.escape(f'1 ids in both idx/train_vis.txt and idx/test_id.txt: {test_image.id}'),
  ):
    records.list_records('llcm', str(root), 'test')
