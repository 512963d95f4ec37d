"""The two formulations (`cal_jax.config.formulations`): which config resolves to which, each
difference as one switch, `--config.formulation` on the command line, and the ablation rows
on the paper's formulation. Every expected value is written out here, from the paper."""

import jax.numpy as jnp
import numpy as np
import pytest
from loss_fakes import fake_outputs
from test_ablations import flat

from cal_jax.config import ablations, cli, formulations
from cal_jax.losses.objective import cal_objective
from configs import llcm, regdb, synthetic, synthetic_baseline, synthetic_proxy, sysu, tiny

# Eq. (20) with the weights of Sec. 4.1, Eq. (18) as the dot product, Eq. (19) through the
# TSAA maps, no identity loss but L_id, Eqs. (13)-(15) with their sums, N_p, alpha, sigma.
PAPER = {
  'formulation': 'paper',
  'loss.id': 1.0,
  'loss.pcl': 1.0,
  'loss.kd1': 1.0,
  'loss.kd2': 1.0,
  'loss.dis': 0.1,
  'loss.div': 0.1,
  'loss.global_id': 0.0,
  'loss.attention_div': 0.0,
  'loss.attention_guidance': 0.0,
  'loss.kd1_form': 'dot',
  'loss.kd2_attention_gradient': True,
  'loss.query_matching': True,
  'loss.pcl_form': 'pcl',
  'loss.pcl_reduction': 'sum',
  'loss.pcl_features': 'unit_parts',  # paper silent on Eq. 15's scale; sigma = 0.6 sets it
  'loss.pcl_margin': 0.6,
  'model.num_parts': 4,
  'model.select_ratio': 0.6,
  'model.part_queries': 'drm',
  'model.attention_similarity': 'tsaa',
  'model.channel_attention': True,
  'model.shared_region_mining': False,
  'model.embedding': 'parts',
}
# The project's variant: the five fields where it differs from the paper.
MEASURED_CHANGES = {
  'formulation': 'measured',
  'loss.kd1': 0.0,
  'loss.kd1_form': 'kl',
  'loss.kd2_attention_gradient': False,
  'loss.global_id': 1.0,
  'loss.pcl_reduction': 'normalised_mean',
}


def value(config, field):
  node = config
  for part in field.split('.'):
    node = node[part]
  return node


def resolved(config, fields):
  return {f: value(config, f) for f in fields}


@pytest.mark.parametrize('module', [sysu, regdb, llcm], ids=lambda m: m.__name__)
def test_real_data_configs_are_the_paper(module):
  assert resolved(module.get_config(), PAPER) == PAPER


@pytest.mark.parametrize(
  'module', [synthetic, synthetic_proxy, tiny], ids=lambda m: m.__name__.split('.')[-1]
)
def test_synthetic_configs_are_the_measured_variant(module):
  assert resolved(module.get_config(), PAPER) == PAPER | MEASURED_CHANGES


def test_the_formulations_differ_in_exactly_the_listed_fields():
  paper = formulations.apply(sysu.get_config(), 'paper')
  measured = formulations.apply(sysu.get_config(), 'measured')
  a, b = flat(paper), flat(measured)
  assert {k for k in a if a[k] != b[k]} == set(MEASURED_CHANGES)
  assert formulations.differences(measured) == {
    f: (PAPER[f], v) for f, v in MEASURED_CHANGES.items() if f != 'formulation'
  }
  assert formulations.differences(paper) == {}


def test_command_line_formulation_comes_before_the_other_overrides():
  """--config.formulation=measured on configs/sysu.py: the measured fields, except the one
  the user also gave, which keeps the user's value; a field not given keeps the file's."""
  config = sysu.get_config()
  config.model.pretrained = 'none'  # what the flags parsed
  config.loss.kd1 = 0.5
  config.formulation = 'measured'
  argv = ['prog', '--config.formulation=measured', '--config.loss.kd1', '0.5']
  assert cli.overridden_fields(argv + ['--', '--config.x=1']) == ['formulation', 'loss.kd1']
  formulations.resolve(config, cli.overridden_fields(argv) + ['model.pretrained'])
  assert resolved(config, PAPER) == PAPER | MEASURED_CHANGES | {'loss.kd1': 0.5}
  assert config.model.pretrained == 'none'
  # Without --config.formulation nothing is rewritten.
  untouched = sysu.get_config()
  untouched.loss.global_id = 0.25
  formulations.resolve(untouched, ['loss.global_id'])
  assert untouched.loss.global_id == 0.25 and untouched.loss.kd1 == 1.0
  with pytest.raises(ValueError, match="must be one of paper, measured, got 'x'"):
    formulations.apply(sysu.get_config(), 'x')


# Every row of Tables 3-5 and Fig. 3 on configs/sysu.py: the paper's values and the row's change.
ROW_CHANGES = {
  'baseline': {
    'loss.id': 0.0,
    'loss.pcl': 0.0,
    'loss.kd1': 0.0,
    'loss.kd2': 0.0,
    'loss.dis': 0.0,
    'loss.div': 0.0,
    'loss.global_id': 1.0,
    'model.embedding': 'global',
  },
  'tca': {'loss.kd1': 0.0, 'loss.kd2': 0.0},
  'full': {},
  'drm_no_div': {'loss.div': 0.0},
  'drm_no_dis': {'loss.dis': 0.0},
  'drm_shared': {'model.shared_region_mining': True},
  'drm_lv': {'model.part_queries': 'learnable', 'loss.dis': 0.0, 'loss.div': 0.0},
  **{
    f'drm_hs_{n}': {
      'model.part_queries': 'horizontal',
      'model.num_parts': n,
      'loss.dis': 0.0,
      'loss.div': 0.0,
    }
    for n in (2, 4, 6)
  },
  'tsaa_sd': {'model.attention_similarity': 'scaled_dot'},
  'tsaa_sd_no_ca': {'model.attention_similarity': 'scaled_dot', 'model.channel_attention': False},
  'pcl_none': {'loss.pcl': 0.0},
  'pcl_triplet': {'loss.pcl_form': 'triplet'},
  'pcl_center': {'loss.pcl_form': 'center'},
  'pcl_ica_cca': {'loss.pcl_form': 'ica_cca'},
  'kd1_only': {'loss.kd2': 0.0},
  'kd2_only': {'loss.kd1': 0.0},
  'no_cqm': {'loss.query_matching': False},
  'cqm': {},
  **{f'parts_{n}': {'model.num_parts': n} for n in (2, 3, 4, 5, 6)},
  **{f'alpha_{a}': {'model.select_ratio': a / 10} for a in (2, 4, 6, 8, 10)},
}


def paper_rows():
  return [
    name
    for table in ('table3', 'table4', 'table5', 'fig3_parts', 'fig3_alpha')
    for name in ablations.TABLES[table]
  ]


def test_every_paper_row_is_listed_here():
  assert set(paper_rows()) == set(ROW_CHANGES)


@pytest.mark.parametrize('name', sorted(ROW_CHANGES))
def test_paper_rows_on_sysu_are_the_paper_with_the_row_s_change(name):
  config = ablations.apply(sysu.get_config(), ablations.ROWS[name])
  assert resolved(config, PAPER) == PAPER | ROW_CHANGES[name]


@pytest.mark.parametrize('name', ['kd1_only', 'kd2_only', 'no_cqm', 'cqm'])
def test_table5_rows_write_eqs_18_and_19_on_the_measured_variant_too(name):
  config = ablations.apply(synthetic.get_config(), ablations.ROWS[name])
  assert config.loss.kd1_form == 'dot' and config.loss.kd2_attention_gradient is True
  assert (config.loss.kd1, config.loss.kd2) == {'kd1_only': (1.0, 0.0), 'kd2_only': (0.0, 1.0)}.get(
    name, (1.0, 1.0)
  )


def test_paper_and_measured_rows_set_the_whole_formulation_and_keep_user_fields():
  on_synthetic = ablations.apply(synthetic_baseline.get_config(), ablations.ROWS['paper'])
  assert resolved(on_synthetic, MEASURED_CHANGES) == {f: PAPER[f] for f in MEASURED_CHANGES}
  # The baseline's own embedding is not a formulation field: it stays.
  assert on_synthetic.model.embedding == 'global'
  grid = sysu.get_config()
  grid.loss.global_id = 0.5  # given on the grid's command line
  measured = ablations.apply(grid, ablations.ROWS['measured'], keep=('loss.global_id',))
  assert resolved(measured, MEASURED_CHANGES) == MEASURED_CHANGES | {'loss.global_id': 0.5}


@pytest.mark.parametrize(
  'field, values',
  [('pcl_reduction', ('sum', 'normalised_mean')), ('pcl_features', ('unit_parts', 'raw'))],
)
def test_each_pcl_switch_changes_l_pcl_and_nothing_else(field, values):
  """The switches of Eq. 14's reduction and Eq. 15's scale: every other term of Eq. (20)
  is unchanged, and the total moves by exactly L_pcl's change."""
  outputs = fake_outputs()
  labels, partner = jnp.array([0, 1, 0, 1]), jnp.array([2, 3, 0, 1])
  terms = []
  for choice in values:
    config = sysu.get_config()
    config.loss[field] = choice
    terms.append(cal_objective(outputs, labels, labels, partner, partner, config.loss)[1])
  first, second = terms
  for term in first:
    if term in ('loss', 'pcl'):
      continue
    np.testing.assert_allclose(float(first[term]), float(second[term]), rtol=1e-6)
  assert abs(float(first['pcl']) - float(second['pcl'])) > 1e-3
  np.testing.assert_allclose(
    float(first['loss']) - float(second['loss']),
    float(first['pcl']) - float(second['pcl']),
    rtol=1e-5,
  )
