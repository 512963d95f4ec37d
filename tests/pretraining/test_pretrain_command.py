"""`python -m cal_jax.pretrain`, run as a user would, at a tiny size: its file starts the
CAL backbone through `config.model.pretrained`, and a rerun with the same inputs does nothing."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from cal_jax.pretraining import weights_file
from cal_jax.training import state as state_lib
from cal_jax.training.state import build_model
from configs import pretrain as pretrain_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIDTH = 4
TINY = {
  'model.width': WIDTH,
  'data.num_categories': 3,
  'data.image_height': 64,
  'data.image_width': 32,
  'data.chains': 16,
  'data.iterations': 12,
  'optim.batch_size': 4,
  'optim.num_steps': 2,
  'optim.warmup_steps': 1,
  'log_every_steps': 1,
}


def pretrain(output):
  return subprocess.run(
    [sys.executable, '-m', 'cal_jax.pretrain', '--output', str(output)]
    + [f'--config.{field}={value}' for field, value in TINY.items()],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )


def _flax_path(key: str) -> tuple[str, tuple[str, ...], bool]:
  """(collection, path in `resnet.ResNet`'s tree, is a convolution) of a torchvision key,
  written here from torchvision's naming, not from the loader's table."""
  *modules, leaf = key.split('.')
  modules = '.'.join(modules)
  modules = re.sub(r'^layer(\d)\.(\d+)', r'layer\1_\2', modules)
  modules = modules.replace('downsample.0', 'downsample_conv').replace(
    'downsample.1', 'downsample_bn'
  )
  parts = tuple(modules.split('.'))
  parts = (('stem',) if parts[0] in ('conv1', 'bn1') else ('stages',)) + parts
  conv = 'conv' in parts[-1] and leaf == 'weight'
  leaves = {'running_mean': 'mean', 'running_var': 'var', 'bias': 'bias'}
  name = 'kernel' if conv else leaves.get(leaf, 'scale')
  collection = 'batch_stats' if leaf.startswith('running_') else 'params'
  return collection, parts + (name,), conv


@pytest.mark.slow
def test_pretrain_writes_weights_that_cal_loads_and_a_rerun_does_nothing(tmp_path, tiny_config):
  output = tmp_path / 'weights' / 'fractal.safetensors'
  first = pretrain(output)
  assert first.returncode == 0, first.stderr[-3000:]
  assert re.search(r'step +2  loss \d+\.\d+  accuracy', first.stdout), first.stdout
  assert 'written' in first.stdout

  # The keys and shapes of torchvision's resnet50(num_classes=3) at width 4.
  state = load_file(str(output))
  assert state['conv1.weight'].shape == (WIDTH, 3, 7, 7)
  assert state['layer4.2.conv3.weight'].shape == (32 * WIDTH, 8 * WIDTH, 1, 1)
  assert state['layer1.0.downsample.0.weight'].shape == (4 * WIDTH, WIDTH, 1, 1)
  assert state['fc.weight'].shape == (3, 32 * WIDTH) and state['fc.bias'].shape == (3,)
  assert len(state) == 267  # 53 convolutions, 53 batch norms of 4 tensors, fc
  # Two steps of training moved the batch-norm statistics off their initial values.
  assert np.abs(state['bn1.running_mean']).max() > 0

  # CAL starts from it through config.model.pretrained, as from ImageNet weights.
  config = tiny_config.copy_and_resolve_references()
  config.model.width = WIDTH
  config.model.pretrained = str(output)
  model = build_model(config, num_classes=6)
  cal = state_lib.initial_state(model, config, steps_per_epoch=4)
  stems = ['stem_visible'] + (['stem_infrared'] if config.model.modality_specific_stem else [])
  for key, value in state.items():
    if key.startswith('fc.'):
      continue
    collection, path, conv = _flax_path(key)
    expected = value.transpose(2, 3, 1, 0) if conv else value
    tree = cal.params if collection == 'params' else cal.batch_stats
    for top in stems if path[0] == 'stem' else ['stages']:
      loaded = tree[top]
      for name in path[1:]:
        loaded = loaded[name]
      np.testing.assert_array_equal(np.asarray(loaded), expected, err_msg=key)

  # A second run with the same inputs finds the file up to date and leaves it alone.
  stamp, record = os.stat(output).st_mtime_ns, (tmp_path / 'weights' / 'fractal.safetensors.json')
  second = pretrain(output)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'up to date' in second.stdout and 'step' not in second.stdout
  assert os.stat(output).st_mtime_ns == stamp
  saved = json.loads(record.read_text())
  assert [r['step'] for r in saved['curve']] == [1, 2]
  config = pretrain_config.get_config()
  for field, value in TINY.items():
    section, name = field.split('.') if '.' in field else (None, field)
    (config[section] if section else config)[name] = value
  assert saved['inputs_hash'] == weights_file.inputs_hash(config)
  config.seed = 1  # other inputs: another hash, so a run would train again
  assert weights_file.inputs_hash(config) != saved['inputs_hash']
  assert not weights_file.is_up_to_date(str(output), weights_file.inputs_hash(config))


def test_an_output_that_cannot_be_written_is_refused_before_training(tmp_path):
  with pytest.raises(ValueError, match='must end with .safetensors'):
    weights_file.check_output(str(tmp_path / 'weights.pth'))
  (tmp_path / 'folder.safetensors').mkdir()
  with pytest.raises(IsADirectoryError, match='is a folder'):
    weights_file.check_output(str(tmp_path / 'folder.safetensors'))


@pytest.mark.slow
def test_a_misspelt_field_or_a_bad_output_is_one_line(tmp_path):
  misspelt = subprocess.run(
    [sys.executable, '-m', 'cal_jax.pretrain', '--output', str(tmp_path / 'w.safetensors')]
    + ['--config.data.num_categoreis=8'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert misspelt.returncode == 1
  assert misspelt.stderr.strip().splitlines()[-1] == (
    "FATAL Flags parsing error: no config field 'num_categoreis' in configs/pretrain.py. "
    'Did you mean "num_categories" instead of "num_categoreis"?'
  )
  assert 'Traceback' not in misspelt.stderr
  wrong = pretrain(tmp_path / 'w.pth')
  assert wrong.returncode == 1 and 'step' not in wrong.stdout
  assert wrong.stderr.strip().splitlines()[-1].startswith('pretrain: error: --output')
  assert not os.listdir(tmp_path)
