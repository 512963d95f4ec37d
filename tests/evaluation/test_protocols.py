"""Tests of cal_jax.evaluation.protocols against the reference listings and draws."""

import dataclasses
import os
import random

import numpy as np
import pytest
import scipy.io
from reference_eval import (
  agw_sysu_gallery,
  agw_sysu_query,
  deen_llcm_gallery,
  deen_llcm_query,
  mpanet_gallery_names,
)

from cal_jax.evaluation import protocols

SYSU_IDS = (1, 2, 5, 10, 33, 120, 333)


@dataclasses.dataclass
class Rec:
  path: str
  id: int
  camera: int
  modality: int


def _touch(folder, names):
  os.makedirs(folder, exist_ok=True)
  for name in names:
    open(os.path.join(folder, name), 'w').close()


@pytest.fixture(scope='module')
def sysu(tmp_path_factory):
  """A SYSU-MM01-like folder; some identities miss some cameras."""
  root = str(tmp_path_factory.mktemp('sysu'))
  rng = random.Random(123)
  _touch(os.path.join(root, 'exp'), [])
  with open(os.path.join(root, 'exp', 'test_id.txt'), 'w') as f:
    f.write(','.join(str(i) for i in SYSU_IDS) + '\n')
  records, counts = [], {}
  for pid in SYSU_IDS:
    for cam in range(1, 7):
      if rng.random() < 0.2:
        continue
      # 1 to 20 files, numbered with gaps as after cleaning.
      n = rng.randint(1, 20)
      numbers = sorted(rng.sample(range(1, 30), n))
      counts[(pid, cam)] = numbers
      folder = os.path.join(root, f'cam{cam}', f'{pid:04d}')
      names = [f'{k:04d}.jpg' for k in numbers]
      _touch(folder, names)
      records += [Rec(folder + '/' + name, pid, cam, 1 if cam in (3, 6) else 0) for name in names]
  rng.shuffle(records)  # the sampler must not depend on the input order
  return root, records, counts


def _paths(records, idx):
  return [records[i].path for i in idx]


def test_sysu_query_matches_agw_listing(sysu):
  root, records, _ = sysu
  assert _paths(records, protocols.sysu_query(records)) == agw_sysu_query(root)


@pytest.mark.parametrize('mode', ['all', 'indoor'])
@pytest.mark.parametrize('shot', ['single', 'multi'])
def test_sysu_gallery_matches_agw_draw(sysu, mode, shot):
  root, records, _ = sysu
  shots = 1 if shot == 'single' else 10
  draws = []
  for trial in range(10):
    ours = _paths(records, protocols.sysu_gallery(records, mode, shot, trial))
    assert ours == agw_sysu_gallery(root, mode, trial, shots)
    draws.append(ours)
  assert len({tuple(d) for d in draws}) > 1  # trials differ


def test_sysu_gallery_shape_and_no_global_random_state(sysu):
  _, records, counts = sysu
  random.seed(99)
  expected_next = random.random()
  random.seed(99)
  single = protocols.sysu_gallery(records, 'all', 'single', 3)
  multi = protocols.sysu_gallery(records, 'indoor', 'multi', 3)
  assert random.random() == expected_next
  groups = [k for k in counts if k[1] in (1, 2, 4, 5)]
  assert len(single) == len(groups)
  indoor = [k for k in counts if k[1] in (1, 2)]
  assert len(multi) == sum(min(10, len(counts[k])) for k in indoor)
  assert len(set(multi.tolist())) == len(multi)
  assert all(records[i].modality == 0 for i in multi)


def _fake_rand_perm(counts, max_id, runs=10, seed=0):
  """A rand_perm_cam cell array shaped as MPANet reads it."""
  rng = np.random.default_rng(seed)
  cells = np.empty((6, 1), dtype=object)
  for cam in range(1, 7):
    inner = np.empty((max_id, 1), dtype=object)
    for pid in range(1, max_id + 1):
      numbers = counts.get((pid, cam), [])
      inner[pid - 1, 0] = (
        np.array([rng.permutation(numbers) for _ in range(runs)], dtype=float)
        if numbers
        else np.zeros((runs, 0))
      )
    cells[cam - 1, 0] = inner
  return cells


@pytest.mark.parametrize('mode', ['all', 'indoor'])
@pytest.mark.parametrize('shot,shots', [('single', 1), ('multi', 10)])
def test_sysu_rand_perm_matches_mpanet(sysu, tmp_path, mode, shot, shots):
  _, records, counts = sysu
  path = str(tmp_path / 'rand_perm_cam.mat')
  scipy.io.savemat(path, {'rand_perm_cam': _fake_rand_perm(counts, 333)})
  perm = protocols.load_rand_perm(path)
  cams = protocols.SYSU_GALLERY_CAMERAS[mode]
  gallery_ids = sorted({r.id for r in records if r.camera in cams})
  for trial in (0, 7):
    split = protocols.build_split(records, f'sysu/{mode}/{shot}', trial, perm)
    ours = sorted(
      '/'.join(os.path.splitext(records[i].path)[0].split('/')[-3:]) for i in split.gallery
    )
    expected = sorted(mpanet_gallery_names(perm, cams, gallery_ids, trial, shots))
    assert ours == expected
    assert split.gallery_draw == f'rand_perm_cam.mat run {trial}'


def test_sysu_rand_perm_missing_entry_is_loud(sysu):
  _, records, counts = sysu
  perm = _fake_rand_perm(counts, 333)
  pid, cam = next(k for k in sorted(counts) if k[1] == 1)
  perm[cam - 1, 0][pid - 1, 0] = np.zeros((0, 0))
  with pytest.raises(ValueError, match='no permutation'):
    protocols.sysu_gallery(records, 'all', 'single', 0, perm)


def test_build_split_sysu_defaults(sysu):
  _, records, _ = sysu
  split = protocols.build_split(records, 'sysu/indoor/single', trial=4)
  assert split.metric == 'sysu'
  assert split.gallery_draw == 'random.seed(4)'
  np.testing.assert_array_equal(split.query, protocols.sysu_query(records))
  # Indoor search keeps the outdoor (cam 6) queries.
  assert {records[i].camera for i in split.query} == {3, 6}
  assert {records[i].camera for i in split.gallery} <= {1, 2}


def test_record_table_input_is_equivalent(sysu):
  _, records, _ = sysu
  table = protocols.RecordTable(
    path=np.array([r.path for r in records], dtype=object),
    id=np.array([r.id for r in records]),
    camera=np.array([r.camera for r in records]),
    modality=np.array([r.modality for r in records]),
  )
  for key in ('sysu/all/single', 'sysu/all/multi'):
    a = protocols.build_split(records, key, 2)
    b = protocols.build_split(table, key, 2)
    np.testing.assert_array_equal(a.gallery, b.gallery)
    np.testing.assert_array_equal(a.query, b.query)


@pytest.fixture(scope='module')
def llcm(tmp_path_factory):
  """An LLCM-like folder (DEEN layout: test_vis/, test_nir/, idx/)."""
  root = str(tmp_path_factory.mktemp('llcm'))
  rng = random.Random(7)
  ids = (3, 8, 13, 400, 1001)
  _touch(os.path.join(root, 'idx'), [])
  with open(os.path.join(root, 'idx', 'test_id.txt'), 'w') as f:
    f.write(','.join(str(i) for i in ids) + '\n')
  records = []
  for modality, sub, cams in (
    (0, 'test_vis', range(1, 10)),
    (1, 'test_nir', (1, 2, 4, 5, 6, 7, 8, 9)),
  ):
    for pid in ids:
      for cam in cams:
        if rng.random() < 0.3:
          continue
        folder = os.path.join(root, sub, f'cam{cam}', f'{pid:04d}')
        names = [
          f'{pid:04d}_c{cam:02d}_s{rng.randint(0, 9)}_{k}.jpg'
          for k in rng.sample(range(100), rng.randint(1, 8))
        ]
        _touch(folder, names)
        records += [Rec(folder + '/' + n, pid, cam, modality) for n in names]
  rng.shuffle(records)
  return root, records


def test_llcm_query_and_gallery_match_deen(llcm):
  root, records = llcm
  for modality, mode in ((0, 1), (1, 2)):
    assert _paths(records, protocols.llcm_query(records, modality)) == deen_llcm_query(root, mode)
    for trial in range(10):
      assert _paths(records, protocols.llcm_gallery(records, modality, trial)) == deen_llcm_gallery(
        root, mode, trial
      )


def test_llcm_directions(llcm):
  root, records = llcm
  n2v = protocols.build_split(records, 'llcm/n2v', 5)
  assert _paths(records, n2v.query) == deen_llcm_query(root, 2)
  assert _paths(records, n2v.gallery) == deen_llcm_gallery(root, 1, 5)
  v2n = protocols.build_split(records, 'llcm/v2n', 5)
  assert _paths(records, v2n.query) == deen_llcm_query(root, 1)
  assert _paths(records, v2n.gallery) == deen_llcm_gallery(root, 2, 5)
  assert v2n.metric == n2v.metric == 'llcm'
  released = protocols.build_split(records, 'llcm/v2n', 5, llcm_v2n_as_released=True)
  np.testing.assert_array_equal(released.query, v2n.gallery)
  np.testing.assert_array_equal(released.gallery, v2n.query)
  assert 'swapped' in released.gallery_draw


def test_regdb_directions():
  records = [Rec(f'Visible/{p}/v{k}.bmp', p, 1, 0) for p in (4, 2) for k in range(3)]
  records += [Rec(f'Thermal/{p}/t{k}.bmp', p, 2, 1) for p in (4, 2) for k in range(3)]
  v2t = protocols.build_split(records, 'regdb/v2t')
  t2v = protocols.build_split(records, 'regdb/t2v')
  np.testing.assert_array_equal(v2t.query, np.arange(6))  # file order kept
  np.testing.assert_array_equal(v2t.gallery, np.arange(6, 12))
  np.testing.assert_array_equal(t2v.query, v2t.gallery)
  np.testing.assert_array_equal(t2v.gallery, v2t.query)
  assert v2t.metric == 'regdb'


def test_every_key_builds_and_bad_keys_raise(sysu, llcm):
  for key in protocols.PROTOCOL_KEYS:
    records = llcm[1] if key.startswith('llcm') else sysu[1]
    split = protocols.build_split(records, key, 1)
    assert split.key == key and len(split.query) and len(split.gallery)
  with pytest.raises(ValueError, match='unknown protocol key'):
    protocols.build_split(sysu[1], 'sysu/all/triple')
  with pytest.raises(ValueError, match='only applies to SYSU'):
    protocols.build_split(llcm[1], 'llcm/n2v', rand_perm=np.zeros((6, 1)))
