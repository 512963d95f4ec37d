"""config_checks: every field of configs/default.py against its valid range.

The command-line cases (a bad value through `python -m cal_jax.main`, a config
file that cannot be loaded) are in test_bad_inputs.py; here each rule is
exercised on its own, fast.
"""

import re

import pytest

from cal_jax.config import checks as config_checks
from cal_jax.config import cli
from configs import default, llcm, regdb, synthetic, synthetic_baseline, sysu, tiny


def leaves(config, prefix=''):
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out.update(leaves(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def test_every_field_of_the_default_config_has_a_rule():
  fields = set(leaves(default.get_config()))
  assert fields == set(config_checks.RULES), fields ^ set(config_checks.RULES)
  assert not fields & set(config_checks.OPTIONAL_RULES)


@pytest.mark.parametrize(
  'module', [tiny, synthetic, synthetic_baseline, default, sysu, regdb, llcm]
)
def test_shipped_configs_pass(module, tmp_path):
  config = module.get_config()
  if not config.data.synthetic:
    config.data.manual_dir = str(tmp_path)
    config.model.pretrained = 'none'  # the opt-out of the ImageNet weights
  config_checks.check_config(config)


@pytest.mark.parametrize('name', ['sysu_mm01', 'regdb', 'llcm'])
def test_a_real_data_set_without_weights_is_refused_in_one_line(tmp_path, name):
  """No silent from-scratch run on real data: the message names the torchvision file and
  the opt-out, and 'none' is accepted (and is not a path made absolute)."""
  config = real(tmp_path, name, 'trial_1' if name == 'regdb' else '')
  config.model.pretrained = ''
  with pytest.raises(config_checks.ConfigError) as raised:
    config_checks.check_config(config)
  message = str(raised.value)
  assert '\n' not in message
  assert message.startswith(f'config.model.pretrained is empty: a real data set ({name})')
  assert 'resnet50-0676ba61.pth' in message and 'resnet50-19c8e357.pth' in message
  assert '--config.model.pretrained=none' in message
  config.model.pretrained = 'none'
  config_checks.check_config(config)
  assert cli.resolve_config_paths(config).model.pretrained == 'none'
  # A resumed run has its weights in the checkpoint; synthetic data trains from scratch.
  config.model.pretrained = ''
  config_checks.check_config(config, resuming=True)
  config_checks.check_config(tiny.get_config())


@pytest.mark.parametrize(
  'field, value, expected',
  [
    ('seed', -1, 'must be an integer in [0, 2147483647]'),
    ('log_every_steps', 0, 'must be an integer >= 1'),
    ('checkpoint_every_steps', 0, 'must be an integer >= 1'),
    ('eval_every_steps', -5, 'must be an integer >= 0'),
    ('keep_checkpoints', 0, 'must be an integer >= 1'),
    ('profile', 1, 'must be True or False'),
    ('data.name', 'market1501', "must be one of 'sysu_mm01', 'regdb', 'llcm'"),
    ('data.synthetic', 'sysu_mm01', "must be one of '', 'sysu', 'regdb', 'llcm'"),
    ('data.synthetic_num_ids', 5, 'must be an integer >= 6'),
    ('data.synthetic_height', 8, 'must be an integer >= 16'),
    ('data.synthetic_infrared_gap', 1.5, 'must be a number in [0, 1]'),
    ('data.synthetic_test_ids', -1, 'must be an integer >= 0 (0: a third of synthetic_num_ids)'),
    ('data.synthetic_seed', -2, 'must be an integer in [-1, 2147483647] (-1: config.seed)'),
    ('data.image_height', -5, 'must be an integer >= 1 (pixels)'),
    ('data.image_width', 0, 'must be an integer >= 1 (pixels)'),
    ('data.num_ids_per_batch', 0, 'must be an integer >= 1'),
    ('data.num_pos', 0, 'must be an integer >= 1'),
    ('data.pad', -1, 'must be an integer >= 0 (pixels)'),
    ('data.random_erasing', 1.5, 'must be a number in [0, 1] (a probability)'),
    ('data.channel_aug_prob', -0.1, 'must be a number in [0, 1] (a probability)'),
    ('data.prefetch', -1, 'must be an integer >= 0'),
    ('data.eval_batch_size', 0, 'must be an integer >= 1'),
    ('data.flip', 'yes', 'must be True or False'),
    ('model.depth', 152, 'must be one of 18, 34, 50, 101'),
    ('model.width', 0, 'must be an integer >= 1'),
    ('model.last_stride', 3, 'must be an integer in [1, 2]'),
    ('model.num_parts', 0, 'must be an integer in [1, 10]'),
    ('model.num_parts', 11, 'must be an integer in [1, 10]'),
    ('model.select_ratio', 0.0, 'must be a number in (0, 1]'),
    ('model.pool_sizes', (1, 2), 'must be a non-empty tuple of odd integers >= 1'),
    ('model.pool_sizes', (), 'must be a non-empty tuple of odd integers >= 1'),
    ('model.adapter_hidden', 0, 'must be an integer >= 1'),
    ('model.adapter_dim', -3, 'must be an integer >= 1'),
    ('model.channel_reduction', 0, 'must be an integer >= 1'),
    ('model.embedding', 'pooled', "must be one of 'parts', 'global'"),
    ('loss.id', -1.0, 'must be a number >= 0 (a loss weight; 0 turns the term off)'),
    ('loss.kd2', float('nan'), 'must be a finite number >= 0'),
    ('loss.pcl_margin', -0.6, 'must be a number >= 0 (sigma of Eq. 15)'),
    ('optim.base_lr', 0.0, 'must be a number > 0'),
    ('optim.warmup_start_lr', -0.01, 'must be a number >= 0'),
    ('optim.final_lr', float('inf'), 'must be a finite number >= 0'),
    ('optim.momentum', 1.0, 'must be a number in [0, 1)'),
    ('optim.backbone_lr_mult', -1.0, 'must be a number >= 0'),
    ('optim.weight_decay', -5e-4, 'must be a number >= 0'),
    ('optim.num_epochs', -1, 'must be an integer >= 0 (0 evaluates the initial model)'),
    ('optim.warmup_epochs', -1, 'must be an integer >= 0'),
    ('optim.steps_per_epoch', -4, 'must be an integer >= 0'),
    ('eval.num_trials', 0, 'must be an integer >= 1'),
    ('eval.enabled', 0, 'must be True or False'),
  ],
)
def test_a_value_outside_its_range_is_named(field, value, expected):
  config = tiny.get_config()
  section, _, name = field.rpartition('.')
  target = config[section] if section else config
  with target.unlocked():
    # Bypasses the ConfigDict's own type check, as a config.json read back does.
    object.__getattribute__(target, '_fields')[name] = value
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.check_config(config)
  shown = repr(value) if isinstance(value, str) else str(value)
  assert str(error.value).startswith(f'config.{field}={shown}: {expected}'), str(error.value)


@pytest.mark.parametrize(
  'field, value',
  [
    ('optim.num_epochs', 0),
    ('eval_every_steps', 0),
    ('data.pad', 0),
    ('data.random_erasing', 0.0),
    ('data.random_erasing', 1.0),
    ('model.select_ratio', 1.0),
    ('data.prefetch', 0),
    ('model.num_parts', 10),
    ('model.pool_sizes', (1,)),
    ('optim.momentum', 0.0),
    ('loss.id', 0.0),
    ('seed', 2**31 - 1),
  ],
)
def test_the_ends_of_each_range_pass(field, value):
  config = tiny.get_config()
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  config_checks.check_config(config)


def test_every_problem_in_one_message():
  config = tiny.get_config()
  config.optim.num_epochs = -1
  config.log_every_steps = 0
  config.data.pad = -1
  message = str(pytest.raises(config_checks.ConfigError, config_checks.check_config, config).value)
  assert message.count('; ') == 2 and '\n' not in message
  for fragment in ('config.optim.num_epochs=-1', 'config.log_every_steps=0', 'config.data.pad=-1'):
    assert fragment in message


def test_a_field_no_rule_knows_is_refused():
  """ml_collections lets a config file add any field: a misspelt one would be ignored."""
  config = tiny.get_config()
  config.model.dept = 18
  with pytest.raises(
    config_checks.ConfigError,
    match=re.escape('config.model.dept: no such field (did you mean config.model.depth?)'),
  ):
    config_checks.check_config(config)


def test_optional_fields_are_checked_when_present():
  config = tiny.get_config()
  config.loss.kd1_form = 'cosine'
  config_checks.check_config(config)
  config.loss.kd1_form = 'l1'
  with pytest.raises(
    config_checks.ConfigError,
    match=re.escape("config.loss.kd1_form='l1': must be one of 'dot', 'cosine', 'kl', 'mse'"),
  ):
    config_checks.check_config(config)


def real(tmp_path, name='sysu_mm01', builder_config=''):
  config = tiny.get_config()
  config.data.synthetic = ''
  config.data.name, config.data.builder_config = name, builder_config
  config.data.manual_dir = str(tmp_path)
  config.model.pretrained = 'none'
  return config


def test_checks_across_fields(tmp_path):
  def refused(config, fragment):
    with pytest.raises(config_checks.ConfigError, match=re.escape(fragment)):
      config_checks.check_config(config)

  refused(real(tmp_path, 'regdb'), "config.data.builder_config='': RegDB needs a trial")
  refused(real(tmp_path, 'regdb', 'trial_11'), "builder_config='trial_11': RegDB needs a trial")
  config_checks.check_config(real(tmp_path, 'regdb', 'trial_10'))
  refused(real(tmp_path, 'llcm', 'trial_1'), 'llcm has no builder configs')
  config = tiny.get_config()
  config.data.synthetic, config.data.builder_config = 'regdb', 'trial_2'
  config.data.synthetic_infrared_gap = 0.5
  refused(config, 'only the synthetic "sysu" layout has an infrared gap')
  config.data.synthetic_infrared_gap = 1.0
  config.data.synthetic_test_ids = 3
  refused(config, 'config.data.synthetic_test_ids=3: only the synthetic "sysu" layout sets')
  config = tiny.get_config()
  config.data.synthetic_test_ids = config.data.synthetic_num_ids - 3
  refused(
    config, f'must be in [2, synthetic_num_ids - 4] = [2, {config.data.synthetic_num_ids - 4}]'
  )

  config = real(tmp_path)
  config.data.manual_dir = ''
  refused(config, 'config.data.manual_dir is empty')
  config.data.manual_dir = str(tmp_path / 'SYSU-MM01')
  refused(config, f"config.data.manual_dir='{tmp_path / 'SYSU-MM01'}' does not exist")

  config = tiny.get_config()
  config.model.pretrained = str(tmp_path / 'resnet50.pth')
  refused(config, f"config.model.pretrained='{tmp_path / 'resnet50.pth'}' does not exist")
  (tmp_path / 'resnet50.npz').write_bytes(b'')
  config.model.pretrained = str(tmp_path / 'resnet50.npz')
  refused(config, 'unknown format; expected .pth, .pt, .safetensors')

  config = tiny.get_config()
  config.eval.rand_perm_path = str(tmp_path / 'rand_perm_cam.mat')
  refused(config, "rand_perm_cam.mat' does not exist")
  (tmp_path / 'rand_perm_cam.mat').write_bytes(b'')
  config_checks.check_config(config)
  config = real(tmp_path, 'regdb', 'trial_1')
  config.eval.rand_perm_path = str(tmp_path / 'rand_perm_cam.mat')
  refused(config, 'only SYSU-MM01 has MATLAB galleries, this config reads regdb')

  config = tiny.get_config()
  config.optim.warmup_epochs = 3
  refused(config, 'config.optim.warmup_epochs=3 is more than config.optim.num_epochs=2')
  config.optim.num_epochs = 0  # the untrained model: the warm-up does not matter
  config_checks.check_config(config)

  config = tiny.get_config()
  config.model.attention_centring, config.model.attention_similarity = True, 'scaled_dot'
  refused(config, "config.model.attention_centring=True: attention_similarity='scaled_dot'")
  for similarity in ('tsaa', 'cosine'):  # both centre IN(T)
    config.model.attention_similarity = similarity
    config_checks.check_config(config)

  config = tiny.get_config()
  for term in config_checks.LOSS_WEIGHTS:
    config.loss[term] = 0.0
  refused(config, 'every loss weight')


def test_partial_configs_of_finished_runs(tmp_path):
  """config.json of an older run: fields it lacks are completed from configs/default.py where
  it is read, once; moved folders are not errors with partial=True; ranges still hold."""
  import json

  from cal_jax.config import run_config
  from configs import default

  config = real(tmp_path)
  config.data.manual_dir = str(tmp_path / 'moved')
  saved = config.to_dict()
  del saved['model']['embedding'], saved['loss']['pcl_features'], saved['eval']['progress_seconds']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  read = run_config.read_run_config(str(tmp_path / 'config.json'))
  defaults = default.get_config()
  assert read.model.embedding == defaults.model.embedding == 'parts'
  assert read.loss.pcl_features == defaults.loss.pcl_features == 'unit_parts'
  assert read.eval.progress_seconds == defaults.eval.progress_seconds
  assert read.data.manual_dir == str(tmp_path / 'moved')  # what the run wrote stays
  assert read.model.width == config.model.width
  config_checks.check_config(read, partial=True)
  with pytest.raises(config_checks.ConfigError, match='config.data.manual_dir'):
    config_checks.check_config(read)  # the folder has moved
  # A config that was not completed is refused, partial or not: no reader has a default.
  del config.model['embedding']
  with pytest.raises(config_checks.ConfigError, match='config.model.embedding is missing'):
    config_checks.check_config(config, partial=True)
  read.data.pad = -1  # ranges still hold
  with pytest.raises(config_checks.ConfigError, match='config.data.pad=-1'):
    config_checks.check_config(read, partial=True)


def test_not_a_config():
  with pytest.raises(config_checks.ConfigError, match='the config is a int'):
    config_checks.check_config(3)
