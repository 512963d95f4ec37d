"""The paper's ablations (Tables 3-5, Fig. 3) as named config overrides.

Each row is a set of `config` fields to change from the run's config; a table
is a list of rows in the paper's order. `python -m cal_jax.ablate` runs them.
On a real-data config (the paper's formulation, `cal_jax/config/formulations.py`)
every row of Tables 3-5 and Fig. 3 is the paper's CAL with exactly that row's
change; Table 5's rows write Eqs. 18 and 19 as the paper does. A row may set
`formulation`: that formulation's fields are written first, then the row's
other fields (and the fields the user gave on the command line, `keep`).

Rows the paper has but this code cannot express would be listed in MISSING
with the reason, and refused by name; every row is expressible now.
"""

import dataclasses
from typing import Any

import ml_collections

from cal_jax.config import formulations
from cal_jax.losses import LOSS_TERMS

# Every loss term of Eq. (20) and the additions but the baseline's global ID loss.
_ALL_TERMS = tuple(t for t in LOSS_TERMS if t != 'global_id')


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  label: str  # as the paper's table writes the row
  overrides: dict[str, Any]


def _row(name: str, label: str, **overrides: Any) -> Row:
  return Row(name, label, {k.replace('__', '.'): v for k, v in overrides.items()})


# Eq. 18 (L_kd1, lambda_1 = 1, the dot product) and Eq. 19 (L_kd2, lambda_2 = 1, through
# the TSAA maps) as the paper writes them: Table 5's rows.
_EQ18 = {'loss__kd1': 1.0, 'loss__kd1_form': 'dot'}
_EQ19 = {'loss__kd2': 1.0, 'loss__kd2_attention_gradient': True}

_BASELINE = {f'loss.{t}': 0.0 for t in _ALL_TERMS} | {
  'loss.global_id': 1.0,
  'model.embedding': 'global',
}

ROWS = {
  r.name: r
  for r in [
    # Table 3: the components.
    Row('baseline', 'Baseline (ID loss)', _BASELINE),
    _row('tca', '+ TCA (DRM, TSAA, PCL)', loss__kd1=0.0, loss__kd2=0.0),
    _row('full', '+ MatchDistill (CAL)'),
    _row(
      'paper',
      'CAL as written (the paper formulation)',
      formulation='paper',
      loss__attention_div=0.0,
      loss__attention_guidance=0.0,
    ),
    _row('measured', 'CAL, the measured formulation (not the paper)', formulation='measured'),
    # Table 4: DRM, TSAA and PCL variants that the model has switches for.
    _row('drm_no_div', 'DRM w/o L_div', loss__div=0.0),
    _row('drm_no_dis', 'DRM w/o L_dis', loss__dis=0.0),
    _row('drm_shared', 'Shared DRM', model__shared_region_mining=True),
    # LV and HS have no DRM regions, so L_dis and L_div (Eqs. 4-5) go with it.
    _row('drm_lv', 'DRM -> LV', model__part_queries='learnable', loss__dis=0.0, loss__div=0.0),
    *[
      _row(
        f'drm_hs_{n}',
        f'DRM -> HS (n = {n})',
        model__part_queries='horizontal',
        model__num_parts=n,
        loss__dis=0.0,
        loss__div=0.0,
      )
      for n in (2, 4, 6)
    ],
    _row('tsaa_sd', 'TSAA (SD)', model__attention_similarity='scaled_dot'),
    _row(
      'tsaa_sd_no_ca',
      'TSAA (SD) w/o CA',
      model__attention_similarity='scaled_dot',
      model__channel_attention=False,
    ),
    _row('pcl_none', 'w/o PCL', loss__pcl=0.0),
    _row('pcl_triplet', 'PCL -> Triplet loss', loss__pcl_form='triplet'),
    _row('pcl_center', 'PCL -> Center loss', loss__pcl_form='center'),
    _row('pcl_ica_cca', 'PCL -> ICA&CCA', loss__pcl_form='ica_cca'),
    # Table 5: MatchDistill's levels and the query matching (CQM), with Eq. 18 (the
    # dot product) and Eq. 19 (through the TSAA maps) as written, on any formulation.
    _row('kd1_only', 'L_kd1 only', **(_EQ18 | _EQ19 | {'loss__kd2': 0.0})),
    _row('kd2_only', 'L_kd2 only', **(_EQ18 | _EQ19 | {'loss__kd1': 0.0})),
    _row('no_cqm', 'L_kd1 + L_kd2 w/o CQM', **_EQ18, **_EQ19, loss__query_matching=False),
    _row('cqm', 'L_kd1 + L_kd2 with CQM', **_EQ18, **_EQ19),
    # Fig. 3: N_p and alpha.
    *[_row(f'parts_{n}', f'N_p = {n}', model__num_parts=n) for n in (2, 3, 4, 5, 6)],
    *[_row(f'alpha_{a}', f'alpha = 0.{a}', model__select_ratio=a / 10) for a in (2, 4, 6, 8)],
    _row('alpha_10', 'alpha = 1.0', model__select_ratio=1.0),
    # Diagnosis of the attention collapse (docs/decisions/model_and_losses.md): one change each.
    *[
      _row(f'kd1_{form}', f'+ L_kd1 = {label}', loss__kd1=1.0, loss__kd1_form=form)
      for form, label in (
        ('dot', '-<S_a, S_b> (Eq. 18)'),
        ('cosine', '1 - cos(S_a, S_b)'),
        ('kl', 'KL(S_a || S_b)'),
        ('mse', '|S_a - S_b|^2'),
      )
    ],
    _row(
      'kd1_kl_attention_div',
      '+ L_kd1 (KL) + attention diversity',
      loss__kd1=1.0,
      loss__kd1_form='kl',
      loss__attention_div=1.0,
    ),
    _row('attention_div', '+ attention diversity (Eq. 5 form)', loss__attention_div=1.0),
    _row(
      'attention_div_cosine',
      "+ attention diversity of the maps' cosines",
      loss__attention_div=1.0,
      loss__attention_div_form='cosine',
    ),
    _row(
      'tsaa_cosine',
      'TSAA with cosine similarity (not in the paper)',
      model__attention_similarity='cosine',
    ),
    _row(
      'tsaa_no_border',
      "TSAA without the map's border tokens (not in the paper)",
      model__attention_border=1,
    ),
    _row(
      'tsaa_centred',
      'TSAA with IN(T) centred per position (not in the paper)',
      model__attention_centring=True,
    ),
    _row(
      'part_classifiers',
      'L_id with a classifier per part query (not in the paper)',
      model__id_classifier='per_part',
    ),
    _row(
      'tsaa_guided',
      "TSAA guided to DRM's regions (not in the paper)",
      loss__attention_guidance=1.0,
    ),
    _row('no_stop_gradient', 'teachers not stopped', loss__stop_teacher_gradient=False),
    _row(
      'kd2_detached',
      '+ MatchDistill, L_kd2 not through the TSAA maps',
      loss__kd2_attention_gradient=False,
    ),
    _row(
      'kd2_through_attention',
      "+ MatchDistill, L_kd2 through the TSAA maps (the paper's)",
      loss__kd2_attention_gradient=True,
    ),
    _row('no_global_id', 'w/o global ID loss', loss__global_id=0.0),
    _row('with_global_id', '+ global ID loss (not in the paper)', loss__global_id=1.0),
    _row('pcl_sum', "PCL with Eq. 14's sums (the paper's)", loss__pcl_reduction='sum'),
    _row(
      'pcl_raw_features',
      "PCL's sums on the raw TSAA outputs (Eq. 15 without unit parts)",
      loss__pcl_reduction='sum',
      loss__pcl_features='raw',
    ),
    _row(
      'pcl_normalised_mean',
      'PCL on unit parts, means per term (not in the paper)',
      loss__pcl_reduction='normalised_mean',
    ),
  ]
}

TABLES = {
  'table3': ('baseline', 'tca', 'full'),
  'table4': (
    'drm_no_div',
    'drm_no_dis',
    'drm_shared',
    'drm_lv',
    'drm_hs_2',
    'drm_hs_4',
    'drm_hs_6',
    'tsaa_sd',
    'tsaa_sd_no_ca',
    'pcl_none',
    'pcl_triplet',
    'pcl_center',
    'pcl_ica_cca',
    'full',
  ),
  'table5': ('kd1_only', 'kd2_only', 'no_cqm', 'cqm'),
  'fig3_parts': tuple(f'parts_{n}' for n in (2, 3, 4, 5, 6)),
  'fig3_alpha': ('alpha_2', 'alpha_4', 'alpha_6', 'alpha_8', 'alpha_10'),
  'diagnosis': (
    'full',
    'paper',
    'measured',
    'kd1_dot',
    'kd1_cosine',
    'kd1_kl',
    'kd1_mse',
    'kd1_kl_attention_div',
    'attention_div',
    'attention_div_cosine',
    'tsaa_cosine',
    'tsaa_no_border',
    'tsaa_centred',
    'part_classifiers',
    'tsaa_guided',
    'tca',
    'pcl_none',
    'no_stop_gradient',
    'kd2_detached',
    'kd2_through_attention',
    'no_global_id',
    'with_global_id',
    'pcl_sum',
    'pcl_raw_features',
    'pcl_normalised_mean',
    'baseline',
  ),
}

MISSING: dict[str, str] = {}  # rows of the paper not expressible here (none now)


def select_rows(spec: str) -> list[Row]:
  """'table3' or 'baseline,full' or 'table3,kd1_kl' -> rows, in order, each once."""
  names: list[str] = []
  for item in (s.strip() for s in spec.split(',') if s.strip()):
    if item in TABLES:
      names.extend(TABLES[item])
    elif item in ROWS:
      names.append(item)
    elif item in MISSING:
      raise ValueError(f'--rows: {item}: {MISSING[item]}')
    else:
      raise ValueError(
        f'--rows: unknown row or table {item!r}; tables: {", ".join(TABLES)}; '
        f'rows: {", ".join(ROWS)}'
      )
  if not names:
    raise ValueError('--rows is empty; name a table (e.g. table3) or rows (e.g. baseline,full)')
  return [ROWS[n] for n in dict.fromkeys(names)]


def apply(
  config: ml_collections.ConfigDict, row: Row, keep: tuple[str, ...] = ()
) -> ml_collections.ConfigDict:
  """A copy of `config` with the row's overrides (each field must exist).

  A row that sets `formulation` writes that formulation's fields first; the fields of
  `keep` (those the user gave on the command line) then keep their values in `config`,
  unless the row sets them too, as `python -m cal_jax.main` resolves the same flags.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if 'formulation' in row.overrides:
    kept = {f: config[f.split('.')[0]][f.split('.')[1]] for f in keep if '.' in f}
    formulations.apply(config, row.overrides['formulation'])
    for field, value in kept.items():
      section, name = field.split('.')
      config[section][name] = value
  for field, value in row.overrides.items():
    if field == 'formulation':
      continue
    section, name = field.split('.')
    if name not in config[section]:
      raise ValueError(f'row {row.name}: config has no field {field}')
    config[section][name] = value
  return config


def as_flags(row: Row) -> list[str]:
  """The row as command-line overrides of `python -m cal_jax.main`."""
  return [f'--config.{field}={value}' for field, value in row.overrides.items()]
