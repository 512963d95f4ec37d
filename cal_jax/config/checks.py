"""Every config field checked against its valid range before anything runs.

  check_config(config, partial=False)   raises ConfigError (a ValueError) that
                                        names each bad field, its value and the
                                        valid range, in one message

`RULES` holds one rule per field of `configs/default.py` (a test keeps the two
in step): its type and range, and what the range means. Checks that involve
several fields (the data set and its builder config, the learning-rate
warm-up and the epochs, paths that must exist) follow in `_cross_checks`.
A field no rule knows (a misspelling in a config file, which ml_collections
accepts silently) is refused, with the closest known name.

`partial=True` is for the `config.json` of a finished run (`cal_jax.convert`,
`cal_jax.visualize`): paths are not required to exist there (the run's data set
folder may have moved since; the command that reads it reports that itself). A
field that runs of an older version did not write was completed from
`configs/default.py` where the file was read (`run_config.read_run_config`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from cal_jax.config import formulations
from cal_jax.config.rules import Bool, Choice, Float, Int, IntChoice, OddSizes, Stages, Text
from cal_jax.data.datasets.specs import SPECS
from cal_jax.losses import LOSS_TERMS
from cal_jax.losses.match_distill import KD1_FORMS
from cal_jax.losses.metric_losses import PCL_FORMS
from cal_jax.losses.part_center_loss import FEATURES as PCL_FEATURES
from cal_jax.losses.part_center_loss import REDUCTIONS as PCL_REDUCTIONS
from cal_jax.losses.region_losses import ATTENTION_DIV_FORMS
from cal_jax.models.attention_adapter import SIMILARITIES
from cal_jax.models.cal import ID_CLASSIFIERS
from cal_jax.models.part_queries import PART_QUERIES
from cal_jax.models.torchvision_weights import PRETRAINED_NONE

# Builders with test protocols (the data set table), and the layout of
# `config.data.synthetic` that generates data for each.
DATASETS = tuple(SPECS)
SYNTHETIC_LAYOUTS = {spec.short: spec.builder for spec in SPECS.values()}
REGDB_BUILDER_CONFIGS = SPECS['regdb'].builder_configs
PRETRAINED_SUFFIXES = ('.pth', '.pt', '.safetensors')
# torchvision's ResNet-50 ImageNet weights, as its two releases name the file.
PRETRAINED_FILE_NAMES = 'resnet50-0676ba61.pth (IMAGENET1K_V2) or resnet50-19c8e357.pth (V1)'
LOSS_WEIGHTS = LOSS_TERMS  # config.loss holds one weight per term
# N_p! part assignments are counted (every checkpoint keeps the counts): 10! is
# 3.6 million int64 counts, 29 MB; 12! would be 3.8 GB.
MAX_NUM_PARTS = 10


class ConfigError(ValueError):
  """One or more config fields outside their valid range."""


_WEIGHT = Float(0.0, note='a loss weight; 0 turns the term off')

# One rule per field of configs/default.py (tests/test_config_checks.py keeps them in step).
RULES: dict[str, Any] = {
  'seed': Int(0, 2**31 - 1),
  'formulation': Choice(formulations.NAMES, note='cal_jax/config/formulations.py'),
  'log_every_steps': Int(1),
  'checkpoint_every_steps': Int(1),
  'eval_every_steps': Int(0, note='0: evaluate at the end only'),
  'keep_checkpoints': Int(1),
  'profile': Bool(),
  'data.name': Choice(DATASETS),
  'data.builder_config': Text(),
  'data.manual_dir': Text(),
  'data.synthetic': Choice(('',) + tuple(SYNTHETIC_LAYOUTS), note='"" for real data'),
  'data.synthetic_num_ids': Int(6),
  'data.synthetic_height': Int(16),
  'data.synthetic_infrared_gap': Float(0.0, 1.0),
  'data.synthetic_test_ids': Int(0, note='0: a third of synthetic_num_ids'),
  'data.synthetic_seed': Int(-1, 2**31 - 1, note='-1: config.seed'),
  'data.synthetic_misalignment': Bool(),
  'data.data_dir': Text(),
  'data.skip_corrupt_images': Bool(),
  'data.image_height': Int(1, note='pixels'),
  'data.image_width': Int(1, note='pixels'),
  'data.num_ids_per_batch': Int(1),
  'data.num_pos': Int(1),
  'data.pad': Int(0, note='pixels'),
  'data.flip': Bool(),
  'data.random_erasing': Float(0.0, 1.0, note='a probability'),
  'data.channel_aug': Bool(),
  'data.channel_aug_prob': Float(0.0, 1.0, note='a probability'),
  'data.balanced_sampler': Bool(),
  'data.prefetch': Int(0),
  'data.eval_batch_size': Int(1),
  'data.eval_flip': Bool(),
  'model.depth': IntChoice((18, 34, 50, 101)),
  'model.width': Int(1),
  'model.last_stride': Int(1, 2),
  'model.modality_specific_stem': Bool(),
  'model.num_parts': Int(1, MAX_NUM_PARTS, note='N_p! part matchings are counted'),
  'model.select_ratio': Float(0.0, 1.0, low_open=True, note='alpha of Eq. 3'),
  'model.pool_sizes': OddSizes(),
  'model.shared_region_mining': Bool(),
  'model.adapter_hidden': Int(1),
  'model.adapter_dim': Int(1),
  'model.channel_reduction': Int(1),
  'model.part_queries': Choice(PART_QUERIES),
  'model.attention_similarity': Choice(SIMILARITIES),
  'model.channel_attention': Bool(),
  'model.attention_border': Int(0, note='tokens left out at each edge of the map'),
  'model.attention_centring': Bool(),
  'model.id_classifier': Choice(ID_CLASSIFIERS),
  'model.embedding': Choice(('parts', 'global')),
  'model.pretrained': Text(),
  'model.dtype': Choice(('float32', 'bfloat16'), note='float16 needs loss scaling: not supported'),
  'model.remat': Stages(),
  'model.remat_nested': Bool(),
  **{f'loss.{name}': _WEIGHT for name in LOSS_WEIGHTS},
  'loss.pcl_margin': Float(0.0, note='sigma of Eq. 15'),
  'loss.pcl_form': Choice(PCL_FORMS),
  'loss.pcl_reduction': Choice(PCL_REDUCTIONS),
  'loss.pcl_features': Choice(PCL_FEATURES),
  'loss.mcca_rho': Float(0.0, note="ICA&CCA's centre margin"),
  'loss.mcca_sigma': Float(0.0, note="ICA&CCA's sample margin"),
  'loss.kd1_form': Choice(KD1_FORMS),
  'loss.query_matching': Bool(),
  'loss.attention_div_form': Choice(ATTENTION_DIV_FORMS),
  'loss.stop_teacher_gradient': Bool(),
  'loss.kd2_attention_gradient': Bool(),
  'optim.base_lr': Float(0.0, low_open=True),
  'optim.warmup_start_lr': Float(0.0),
  'optim.final_lr': Float(0.0),
  'optim.momentum': Float(0.0, 1.0, high_open=True),
  'optim.nesterov': Bool(),
  'optim.backbone_lr_mult': Float(0.0),
  'optim.weight_decay': Float(0.0),
  'optim.num_epochs': Int(0, note='0 evaluates the initial model'),
  'optim.warmup_epochs': Int(0),
  'optim.steps_per_epoch': Int(0, note="0: the standard codebases' count"),
  'eval.enabled': Bool(),
  'eval.num_trials': Int(1),
  'eval.rand_perm_path': Text(),
  'eval.pictures': Bool(),
  'eval.progress_seconds': Float(0.0, note='0: a line after every batch and trial'),
  'eval.cache_features': Bool(),
  'eval.rerank': Bool(),
  'eval.rerank_k1': Int(1),
  'eval.rerank_k2': Int(1),
  'eval.rerank_lambda': Float(0.0, 1.0),
}


# Fields that configs of some versions have and others lack: checked when present.
OPTIONAL_RULES: dict[str, Any] = {}


def _leaves(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key in config:
    value = config[key]
    name = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
      out.update(_leaves(value, name + '.'))
    else:
      out[name] = value
  return out


def _value(config: ml_collections.ConfigDict, field: str, default: Any = None) -> Any:
  node = config
  for part in field.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      return default
    node = node[part]
  return node


def dataset_name(config: ml_collections.ConfigDict) -> str:
  """The tfds builder the config reads: the synthetic layout's, else data.name."""
  synthetic = _value(config, 'data.synthetic', '')
  return SYNTHETIC_LAYOUTS.get(synthetic, _value(config, 'data.name', ''))


def _show(value: Any) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def _cross_checks(
  config: ml_collections.ConfigDict, partial: bool, resuming: bool = False
) -> list[str]:
  problems = []
  get = lambda field: _value(config, field)
  synthetic = get('data.synthetic')
  name = dataset_name(config)
  builder_config = get('data.builder_config')
  if name == 'regdb' and builder_config not in REGDB_BUILDER_CONFIGS:
    problems.append(
      f'config.data.builder_config={builder_config!r}: RegDB needs a trial, one of '
      "'trial_1' .. 'trial_10'"
    )
  elif name in ('sysu_mm01', 'llcm') and builder_config:
    problems.append(
      f'config.data.builder_config={builder_config!r}: {name} has no builder configs; set it to ""'
    )
  if get('loss.pcl_features') == 'raw' and get('loss.pcl_reduction') != 'sum':
    problems.append(
      "config.loss.pcl_features='raw' goes with config.loss.pcl_reduction='sum' only: the "
      "normalised mean works on unit parts; set pcl_features='unit_parts'"
    )
  gap = get('data.synthetic_infrared_gap')
  if synthetic and synthetic != 'sysu' and gap != 1.0:
    problems.append(
      f'config.data.synthetic_infrared_gap={gap}: only the synthetic "sysu" '
      'layout has an infrared gap; leave it at 1.0'
    )
  test_ids = get('data.synthetic_test_ids')
  num_ids = get('data.synthetic_num_ids')
  if synthetic and test_ids and synthetic != 'sysu':
    problems.append(
      f'config.data.synthetic_test_ids={test_ids}: only the synthetic "sysu" layout sets '
      'its test identities; leave it at 0'
    )
  elif synthetic and test_ids and not 2 <= test_ids <= num_ids - 4:
    problems.append(
      f'config.data.synthetic_test_ids={test_ids}: must be in [2, synthetic_num_ids - 4] = '
      f'[2, {num_ids - 4}] so that some identities train'
    )
  manual_dir = get('data.manual_dir')
  if not partial and not synthetic:
    if not manual_dir:
      problems.append(
        f'config.data.manual_dir is empty: set it to the folder of {name} as its '
        'owners distribute it (--config.data.manual_dir=/path/to/it), or use '
        'configs/synthetic.py for the built-in synthetic data'
      )
    elif not os.path.isdir(manual_dir):
      problems.append(
        f'config.data.manual_dir={manual_dir!r} does not exist'
        + (' (it is a file)' if os.path.exists(manual_dir) else '')
        + f': point it at the folder of {name}; data prepared from it earlier is not used '
        'without it'
      )
  data_dir = get('data.data_dir')
  if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    problems.append(f'config.data.data_dir={data_dir!r} is a file, not a folder')
  pretrained = get('model.pretrained')
  if not pretrained and not synthetic and not partial and not resuming:
    problems.append(
      f'config.model.pretrained is empty: a real data set ({name}) trains from the '
      'torchvision ResNet-50 ImageNet state dict; set --config.model.pretrained=/path/to/'
      f'{PRETRAINED_FILE_NAMES} (nothing is downloaded), or '
      '--config.model.pretrained=none to train from scratch on purpose'
    )
  if pretrained == PRETRAINED_NONE:
    pass
  elif pretrained and not partial and not resuming:
    if not os.path.isfile(pretrained):
      problems.append(
        f'config.model.pretrained={pretrained!r} does not exist'
        + (' (it is a folder)' if os.path.isdir(pretrained) else '')
        + "; nothing is downloaded: save a torchvision model's state_dict() there"
      )
    elif os.path.splitext(pretrained)[1].lower() not in PRETRAINED_SUFFIXES:
      problems.append(
        f'config.model.pretrained={pretrained!r}: unknown format; expected '
        f'{", ".join(PRETRAINED_SUFFIXES)}'
      )
  rand_perm = get('eval.rand_perm_path')
  if rand_perm:
    if name != 'sysu_mm01':
      problems.append(
        f'config.eval.rand_perm_path={rand_perm!r}: only SYSU-MM01 has MATLAB '
        f'galleries, this config reads {name}; set it to ""'
      )
    elif not partial and not os.path.isfile(rand_perm):
      problems.append(
        f'config.eval.rand_perm_path={rand_perm!r} does not exist: give the '
        'data set\'s exp/rand_perm_cam.mat, or "" for seeded galleries'
      )
  if get('model.attention_centring') is True and (
    get('model.attention_similarity') == 'scaled_dot'
  ):
    problems.append(
      "config.model.attention_centring=True: attention_similarity='scaled_dot' (Eq. 6) has "
      'no IN(T) to centre; set attention_centring=False, or another attention_similarity'
    )
  epochs, warmup = get('optim.num_epochs'), get('optim.warmup_epochs')
  if isinstance(epochs, int) and isinstance(warmup, int) and epochs > 0 and warmup > epochs:
    problems.append(
      f'config.optim.warmup_epochs={warmup} is more than '
      f'config.optim.num_epochs={epochs}: training would end during the warm-up'
    )
  weights = [get(f'loss.{term}') for term in LOSS_WEIGHTS]
  if all(isinstance(w, (int, float)) and w == 0 for w in weights):
    problems.append(
      'every loss weight (config.loss.'
      + ', '.join(LOSS_WEIGHTS)
      + ') is 0: nothing would be learned'
    )
  return problems


def check_config(
  config: ml_collections.ConfigDict, *, partial: bool = False, resuming: bool = False
) -> None:
  """Refuses a config with a field outside its valid range (see the module doc).

  `resuming`: the run continues from a checkpoint, which holds the ImageNet
  weights already, so `config.model.pretrained` need not exist any more.

  Raises:
    ConfigError: one message naming every bad field, its value and its range.
  """
  if not isinstance(config, (ml_collections.ConfigDict, Mapping)):
    raise ConfigError(f'the config is a {type(config).__name__}, not an ml_collections.ConfigDict')
  leaves = _leaves(config)
  known = {**RULES, **OPTIONAL_RULES}
  problems = []
  for field, value in leaves.items():
    rule = known.get(field)
    if rule is None:
      close = difflib.get_close_matches(field, list(known), n=1)
      problems.append(
        f'config.{field}: no such field'
        + (f' (did you mean config.{close[0]}?)' if close else '')
        + '; every field is documented in configs/default.py'
      )
      continue
    problem = rule.problem(value)
    if problem:
      problems.append(f'config.{field}={_show(value)}: {problem}')
  problems += [
    f'config.{field} is missing (every config starts from configs/default.py)'
    for field in RULES
    if field not in leaves
  ]
  if not problems:  # ranges first: the cross-checks assume well-typed values
    problems = _cross_checks(config, partial, resuming)
  if problems:
    raise ConfigError('; '.join(problems))
