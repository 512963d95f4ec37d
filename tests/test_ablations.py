"""The ablation rows (`cal_jax.config.ablations`) and the grid command (`cal_jax.ablate`)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from loss_fakes import fake_outputs

from cal_jax.config import ablations
from cal_jax.losses.objective import cal_objective
from cal_jax.training.state import build_model
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat(config):
  out = {}
  for section, fields in config.to_dict().items():
    if isinstance(fields, dict):
      out.update({f'{section}.{k}': v for k, v in fields.items()})
    else:
      out[section] = fields
  return out


@pytest.mark.parametrize('name', sorted(ablations.ROWS))
def test_each_row_changes_its_fields_and_only_those(name):
  row = ablations.ROWS[name]
  base = tiny.get_config()
  changed = flat(ablations.apply(base, row))
  before = flat(base)
  assert set(changed) == set(before)
  differs = {k for k in before if before[k] != changed[k]}
  # A row that names a formulation may also change the fields where the two differ.
  allowed = set(row.overrides) | (
    {
      'loss.kd1',
      'loss.kd1_form',
      'loss.kd2_attention_gradient',
      'loss.global_id',
      'loss.pcl_reduction',
    }
    if 'formulation' in row.overrides
    else set()
  )
  assert differs <= allowed, differs - allowed
  for field, value in row.overrides.items():
    assert changed[field] == value


LOSS_ROWS = [
  n
  for n, r in ablations.ROWS.items()
  if r.overrides
  and all(k.startswith('loss.') and isinstance(v, float) for k, v in r.overrides.items())
]


@pytest.mark.parametrize('name', LOSS_ROWS)
def test_loss_weight_rows_remove_exactly_their_terms_from_eq20(name):
  """total(row) = total(full) - sum over changed weights of (w_full - w_row) * term."""
  base = tiny.get_config()
  base.loss.attention_div = 0.5  # every term on, so that each row has something to drop
  row_weights = ablations.apply(base, ablations.ROWS[name]).loss
  outputs = fake_outputs()
  labels, partner = jnp.array([0, 1, 0, 1]), jnp.array([2, 3, 0, 1])
  total_full, terms, _ = cal_objective(outputs, labels, labels, partner, partner, base.loss)
  total_row, terms_row, _ = cal_objective(outputs, labels, labels, partner, partner, row_weights)
  expected = float(total_full) - sum(
    (base.loss[f.split('.')[1]] - v) * float(terms[f.split('.')[1]])
    for f, v in ablations.ROWS[name].overrides.items()
  )
  np.testing.assert_allclose(float(total_row), expected, rtol=1e-5, atol=1e-6)
  for term in terms:  # the terms themselves are still computed (and logged) unchanged
    if term != 'loss':
      np.testing.assert_allclose(float(terms_row[term]), float(terms[term]), rtol=1e-6)


def param_shapes(config):
  model = build_model(config, num_classes=5)
  images = jnp.zeros((2, config.data.image_height, config.data.image_width, 3))
  partner = jnp.array([1, 0])
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), images, images, partner, partner)
  )
  return {
    '/'.join(str(getattr(p, 'key', p)) for p in path): leaf.shape
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params'])
  }


def test_shared_drm_row_has_one_region_miner():
  base = param_shapes(tiny.get_config())
  shared = param_shapes(ablations.apply(tiny.get_config(), ablations.ROWS['drm_shared']))
  assert any('region_mining_infrared' in k for k in base)
  assert not any('region_mining_infrared' in k for k in shared)
  assert {k for k in base if 'region_mining_infrared' not in k} == set(shared)


@pytest.mark.parametrize('parts', [2, 6])
def test_parts_rows_set_the_number_of_part_prototypes(parts):
  config = ablations.apply(tiny.get_config(), ablations.ROWS[f'parts_{parts}'])
  outputs = jax.eval_shape(
    lambda: build_model(config, 5).init_with_output(
      jax.random.key(0),
      jnp.zeros((2, 64, 32, 3)),
      jnp.zeros((2, 64, 32, 3)),
      jnp.array([1, 0]),
      jnp.array([1, 0]),
    )[0]
  )
  assert outputs['sim_vv'].shape[1] == parts
  assert outputs['logits_vi'].shape[1] == parts


def test_select_rows():
  assert [r.name for r in ablations.select_rows('table3')] == ['baseline', 'tca', 'full']
  assert [r.name for r in ablations.select_rows('table3,full, kd1_kl')] == [
    'baseline',
    'tca',
    'full',
    'kd1_kl',
  ]
  with pytest.raises(ValueError, match="unknown row or table 'tabel3'"):
    ablations.select_rows('tabel3')
  assert [r.name for r in ablations.select_rows('pcl_ica_cca')] == ['pcl_ica_cca']
  with pytest.raises(ValueError, match='empty'):
    ablations.select_rows(' , ')


@pytest.mark.slow
def test_ablate_runs_two_rows_end_to_end_and_resumes(tiny_grid):
  command, workdir, done = tiny_grid  # rows baseline and full, one seed (tests/conftest.py)
  assert '2 runs (2 rows x 1 seeds), 0 already done' in done.stdout
  assert 'ETA' in done.stdout
  assert '| Baseline (ID loss) | 1 |' in done.stdout
  table = json.loads((workdir / 'ablation.json').read_text())
  assert table['protocol'] == 'sysu/all/single'
  for name in ('baseline', 'full'):
    results = json.loads((workdir / name / 'seed_0' / 'eval_results.json').read_text())
    assert table['rows'][name]['R1'] == pytest.approx(results['sysu/all/single']['R1'])
    assert table['rows'][name]['R1_std_draws'] == pytest.approx(
      results['sysu/all/single']['R1_std']
    )
  baseline_config = json.loads((workdir / 'baseline' / 'seed_0' / 'config.json').read_text())
  assert baseline_config['model']['embedding'] == 'global'
  assert baseline_config['loss']['kd1'] == 0.0 and baseline_config['eval']['pictures'] is False
  assert (workdir / 'ablation.png').stat().st_size > 1000
  assert (workdir / 'ablation.md').read_text().startswith('sysu/all/single')
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert '2 already done' in again.stdout and 'training' not in again.stdout
  # A finished run is not read back as a row it no longer is (an older default, or
  # other --config flags): refused in one line naming the row and the field.
  before = (workdir / 'ablation.json').read_text()
  changed = subprocess.run(
    [*command, '--config.loss.pcl=0.5'], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert changed.returncode != 0
  error = changed.stderr.strip().splitlines()[-1]
  assert error.startswith('cal_jax.ablate: error: row full, seed 0:'), error
  assert 'loss.pcl: run=1.0, now=0.5' in error and 'another --workdir' in error
  assert (workdir / 'ablation.json').read_text() == before


@pytest.mark.slow
def test_ablate_refuses_a_bad_row_in_one_line(tmp_path):
  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'cal_jax.ablate',
      '--config',
      'configs/tiny.py',
      '--rows',
      'table3,nope',
      '--workdir',
      str(tmp_path / 'g'),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 1
  assert "cal_jax.ablate: error: --rows: unknown row or table 'nope'" in done.stderr
  assert 'Traceback' not in done.stderr
