"""The catalogue of bad input: each case through what a user runs.

Each gets a message naming the file, field or value and what to do, a non-zero
exit (`python -m cal_jax.main` in a subprocess where the case is about the
command, else the exception of the public function the command calls), and
leaves what a run had written (checkpoints, config.json, eval_results.json) as
it was. Most cases start from a copy of the shared tiny run (`tiny_run`).

Unit-level variants live beside the code they test: every data set layout in
test_datasets.py, every pretrained mismatch (missing, unexpected and reshaped
keys, width, DataParallel prefixes) in test_pretrained.py, the fingerprint in
test_checkpointing.py, the atomic results file in test_evaluate.py, the
sampler's checks in test_sampler.py and the non-finite loss in
test_train_loop.py.
"""

import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cal_jax import train
from cal_jax import workdir as workdir_lib
from cal_jax.datasets import images, records, synthetic
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')


def run_main(*args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'cal_jax.main', '--config', TINY, *args],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout)


def snapshot(workdir):
  """{relative path: sha1} of every file a run wrote (the data set copies aside)."""
  out = {}
  for folder, _, files in os.walk(workdir):
    rel = os.path.relpath(folder, workdir)
    if rel.split(os.sep)[0] in ('synthetic_data', 'tfds'):
      continue
    for name in files:
      with open(os.path.join(folder, name), 'rb') as f:
        out[os.path.normpath(os.path.join(rel, name))] = hashlib.sha1(f.read()).hexdigest()
  return out


@pytest.fixture
def run_copy(tiny_run, tmp_path):
  """A private copy of the tiny run, and its files as they were."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run[1], workdir)
  before = snapshot(workdir)
  assert any(p.startswith('checkpoints') for p in before) and 'config.json' in before
  assert 'eval_results.json' in before
  return workdir, before


def assert_one_line_error(result, *fragments):
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in result.stderr, (fragment, result.stderr[-3000:])


@pytest.fixture(scope='module')
def sysu_tree(tmp_path_factory):
  """A SYSU-MM01 folder in the tiny config's size, generated once; copy it to damage it."""
  root = tmp_path_factory.mktemp('sysu_tree') / 'SYSU-MM01'
  synthetic.generate('sysu', str(root), num_ids=24, seed=0, height=64)
  return root


def real_data_config(root, data_dir):
  config = tiny.get_config()
  config.data.synthetic = ''
  config.data.manual_dir, config.data.data_dir = str(root), str(data_dir)
  return config


# ------------------------------------------------------------------- data ---


def test_incomplete_dataset_folder(sysu_tree, run_copy, tmp_path):
  workdir, before = run_copy
  root = tmp_path / 'SYSU-MM01'
  shutil.copytree(sysu_tree, root)
  shutil.rmtree(root / 'cam3')
  result = run_main('--workdir', workdir, '--config.data.synthetic=',
                    f'--config.data.manual_dir={root}', f'--config.data.data_dir={tmp_path}/tfds')
  assert_one_line_error(result, 'cal_jax.main: error: SYSU-MM01 folder', str(root),
                        'missing cam3/', 'expected: cam1/, cam2/, cam3/', 'to do:')
  assert snapshot(workdir) == before


def test_truncated_image_fails_naming_it(sysu_tree, run_copy, tmp_path):
  workdir, before = run_copy
  root = tmp_path / 'SYSU-MM01'
  shutil.copytree(sysu_tree, root)
  victim = records.list_records('sysu', str(root), 'train')[7].path
  data = (root / victim).read_bytes()
  (root / victim).write_bytes(data[:len(data) // 3])
  config = real_data_config(root, tmp_path / 'tfds')
  with pytest.raises(images.CorruptImageError) as error:
    train.train_and_evaluate(config, workdir)
  assert error.value.path == str(root / victim)
  assert 'skip_corrupt_images=True' in str(error.value)
  assert snapshot(workdir) == before
  assert not (tmp_path / 'tfds' / 'sysu_mm01' / '1.0.0').exists()  # nothing half-prepared

  # Asked to, the preparation leaves it out, and every run names it again.
  from cal_jax import data  # pylint: disable=g-import-not-at-top
  config.data.skip_corrupt_images = True
  lines = []
  handler = _CollectWarnings(lines)
  with handler:
    splits = data.load_splits(config, workdir)
    data.load_splits(config, workdir)  # prepared: reported from the metadata
  assert victim not in set(splits.train.path.tolist())
  assert len(splits.train) == len(records.list_records('sysu', str(root), 'train')) - 1
  assert sum(f'leaving out {root / victim}' in line for line in lines) == 1
  assert sum(re.search(rf'1 unreadable images were left out .*: {re.escape(victim)}$', line)
             is not None for line in lines) == 2


class _CollectWarnings:
  """absl warnings into a list, while in the `with` block."""

  def __init__(self, lines):
    import logging  # pylint: disable=g-import-not-at-top
    self.lines, self.logger = lines, logging.getLogger('absl')
    self.handler = logging.Handler(logging.WARNING)
    self.handler.emit = lambda record: lines.append(record.getMessage())

  def __enter__(self):
    self.logger.addHandler(self.handler)

  def __exit__(self, *args):
    self.logger.removeHandler(self.handler)


def test_training_identity_with_one_modality_is_named(sysu_tree, run_copy, tmp_path):
  workdir, before = run_copy
  root = tmp_path / 'SYSU-MM01'
  shutil.copytree(sysu_tree, root)
  train_ids = sorted({r.id for r in records.list_records('sysu', str(root), 'train')})
  for camera in ('cam3', 'cam6'):  # SYSU-MM01's infrared cameras
    shutil.rmtree(root / camera / f'{train_ids[2]:04d}', ignore_errors=True)
  with pytest.raises(ValueError, match=rf'have no infrared image.*\[{train_ids[2]}\].*restore '
                     'the missing infrared images, or remove these identities'):
    train.train_and_evaluate(real_data_config(root, tmp_path / 'tfds'), workdir)
  assert snapshot(workdir) == before


# ----------------------------------------------------------------- config ---


@pytest.mark.parametrize('override, message', [
    ('--config.model.dept=18',
     "no config field 'dept' in --config.model.dept=18. Did you mean \"depth\""),
    ('--config.model.depth=fifty',
     "flag --config.model.depth=fifty: invalid literal for int() with base 10: 'fifty'"),
])
def test_config_override_of_unknown_field_or_wrong_type(override, message, tmp_path):
  result = run_main('--workdir', str(tmp_path / 'run'), override, timeout=120)
  assert_one_line_error(result, 'FATAL Flags parsing error: ' + message)
  assert not (tmp_path / 'run').exists()


def test_checkpoint_of_another_config(run_copy):
  workdir, before = run_copy
  result = run_main('--workdir', workdir, '--config.model.num_parts=3')
  assert_one_line_error(result, 'cal_jax.main: error: The checkpoint at step 0 in',
                        'num_parts: checkpoint=4, config=3', 'Start a fresh run with another '
                        '--workdir, or resume with the config that wrote this checkpoint')
  assert snapshot(workdir) == before


def test_batch_not_divisible_by_the_devices(run_copy):
  workdir, before = run_copy
  config = tiny.get_config()
  config.data.num_ids_per_batch = 3
  with pytest.raises(ValueError, match=re.escape(
      'config.data.num_ids_per_batch=3 must be divisible by num_hosts * local_devices = '
      '1 * 2 = 2')):
    train.train_and_evaluate(config, workdir)
  assert snapshot(workdir) == before


def test_pretrained_file_of_another_architecture(tiny_run, tmp_path):
  """Read at a fresh start only (a resumed run has the weights in its checkpoint)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from cal_jax import pretrained  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'fresh')
  config = tiny.get_config()
  config.data.manual_dir = os.path.join(tiny_run[1], 'synthetic_data')
  config.data.data_dir = os.path.join(tiny_run[1], 'tfds')
  path = str(tmp_path / 'resnet18.safetensors')
  save_file({name: np.zeros(pretrained.torch_shape(target), np.float32)
             for name, target in pretrained.param_mapping(18, config.model.width).items()}, path)
  config.model.pretrained = path
  with pytest.raises(pretrained.CheckpointMismatchError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert path in message and 'looks like a resnet18 checkpoint' in message
  assert 'config.model.depth=18' in message
  assert snapshot(workdir) == {}  # nothing written: no checkpoint, no config.json


# ---------------------------------------------------------------- workdir ---


def test_workdir_that_cannot_be_created(tmp_path):
  """A path under a regular file: fails at once, before any data is read."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('keep me')
  result = run_main('--workdir', str(blocker / 'run'))
  assert_one_line_error(result, f"cal_jax.main: error: cannot create the workdir "
                        f"'{blocker / 'run'}': Not a directory", 'Choose another --workdir')
  assert blocker.read_text() == 'keep me'


def test_read_only_workdir(run_copy, monkeypatch):
  """chmod where it binds; as root (permission bits do not stop root) the write fails
  as a read-only mount makes it fail."""
  workdir, before = run_copy
  if os.geteuid() == 0:
    def read_only(*args, **kwargs):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(workdir_lib.tempfile, 'mkstemp', read_only)
  else:
    os.chmod(workdir, 0o555)
  try:
    with pytest.raises(workdir_lib.WorkdirError,
                       match=rf"cannot write in the workdir '{re.escape(workdir)}': "
                             r'(Read-only file system|Permission denied)\. Choose another'):
      train.evaluate_checkpoint(tiny.get_config(), workdir)
  finally:
    os.chmod(workdir, 0o755)
  assert snapshot(workdir) == before


def test_workdir_on_a_full_disk(run_copy, monkeypatch):
  """Refused before the first step when the disk cannot hold the run's checkpoints."""
  workdir, before = run_copy
  statvfs = os.statvfs

  def nearly_full(path):
    real = statvfs(path)
    return os.statvfs_result((real.f_bsize, 4096, real.f_blocks, 256, 256) + tuple(real)[5:])
  monkeypatch.setattr(workdir_lib.os, 'statvfs', nearly_full)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=rf"the disk of the workdir '{re.escape(workdir)}' has 1\.0 MiB free; "
                           r'this run needs about \d+\.\d MiB .*lower config\.keep_checkpoints'):
    train.train_and_evaluate(tiny.get_config(), workdir)
  assert snapshot(workdir) == before


def test_full_disk_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
  """config.json and eval_results.json are replaced atomically: a write that fails
  (ENOSPC) leaves the old file and no debris."""
  path = tmp_path / 'config.json'
  path.write_text('old')

  def no_space(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(workdir_lib.os, 'fsync', no_space)
  with pytest.raises(OSError, match='No space left on device'):
    workdir_lib.write_text_atomically(str(path), 'new')
  assert path.read_text() == 'old' and os.listdir(tmp_path) == ['config.json']
