"""The catalogue of bad input: each case through what a user runs.

Each gets a message naming the file, field or value and what to do, a non-zero
exit (`python -m cal_jax.main` in a subprocess where the case is about the
command, else the exception of the public function the command calls), and
leaves what a run had written (checkpoints, config.json, eval_results.json) as
it was. Most cases start from a copy of the shared tiny run (`tiny_run`).

Unit-level variants live beside the code they test: every data set layout in
data/test_datasets.py, every pretrained mismatch (missing, unexpected and reshaped
keys, width, DataParallel prefixes) in models/test_torchvision_weights.py, the fingerprint in
training/test_checkpointing.py, the atomic results file in evaluation/test_evaluator.py, the
sampler's checks in data/test_sampler.py and the non-finite loss in
training/test_loop.py.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cal_jax.data import images
from cal_jax.data.datasets import records, synthetic
from cal_jax.runtime import workdir as workdir_lib
from cal_jax.training import loop
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')


def run_main(*args, timeout=300):
  return subprocess.run(
    [sys.executable, '-m', 'cal_jax.main', '--config', TINY, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


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
  config.model.pretrained = 'none'  # a real data set's opt-out of the ImageNet weights
  config.data.manual_dir, config.data.data_dir = str(root), str(data_dir)
  return config


# ------------------------------------------------------------------- data ---


@pytest.mark.slow
def test_incomplete_dataset_folder(sysu_tree, run_copy, tmp_path):
  workdir, before = run_copy
  root = tmp_path / 'SYSU-MM01'
  shutil.copytree(sysu_tree, root)
  shutil.rmtree(root / 'cam3')
  result = run_main(
    '--workdir',
    workdir,
    '--config.data.synthetic=',
    '--config.model.pretrained=none',
    f'--config.data.manual_dir={root}',
    f'--config.data.data_dir={tmp_path}/tfds',
  )
  assert_one_line_error(
    result,
    'cal_jax.main: error: SYSU-MM01 folder',
    str(root),
    'missing cam3/',
    'expected: cam1/, cam2/, cam3/',
    'to do:',
  )
  assert snapshot(workdir) == before


def test_truncated_image_fails_naming_it(sysu_tree, run_copy, tmp_path):
  workdir, before = run_copy
  root = tmp_path / 'SYSU-MM01'
  shutil.copytree(sysu_tree, root)
  victim = records.list_records('sysu', str(root), 'train')[7].path
  data = (root / victim).read_bytes()
  (root / victim).write_bytes(data[: len(data) // 3])
  config = real_data_config(root, tmp_path / 'tfds')
  with pytest.raises(images.CorruptImageError) as error:
    loop.train_and_evaluate(config, workdir)
  assert error.value.path == str(root / victim)
  assert 'skip_corrupt_images=True' in str(error.value)
  assert snapshot(workdir) == before
  assert not (tmp_path / 'tfds' / 'sysu_mm01' / '1.0.0').exists()  # nothing half-prepared

  # Asked to, the preparation leaves it out, and every run names it again.
  from cal_jax.data import splits as data

  config.data.skip_corrupt_images = True
  lines = []
  handler = _CollectWarnings(lines)
  with handler:
    splits = data.load_splits(config, workdir)
    data.load_splits(config, workdir)  # prepared: reported from the metadata
  assert victim not in set(splits.train.path.tolist())
  assert len(splits.train) == len(records.list_records('sysu', str(root), 'train')) - 1
  assert sum(f'leaving out {root / victim}' in line for line in lines) == 1
  assert (
    sum(
      re.search(rf'1 unreadable images were left out .*: {re.escape(victim)}$', line) is not None
      for line in lines
    )
    == 2
  )


class _CollectWarnings:
  """absl warnings into a list, while in the `with` block."""

  def __init__(self, lines):
    import logging

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
  with pytest.raises(
    ValueError,
    match=rf'have no infrared image.*\[{train_ids[2]}\].*restore '
    'the missing infrared images, or remove these identities',
  ):
    loop.train_and_evaluate(real_data_config(root, tmp_path / 'tfds'), workdir)
  assert snapshot(workdir) == before


# ----------------------------------------------------------------- config ---


@pytest.mark.slow
@pytest.mark.parametrize(
  'override, message',
  [
    (
      '--config.model.dept=18',
      'no config field \'dept\' in --config.model.dept=18. Did you mean "depth"',
    ),
    (
      '--config.model.depth=fifty',
      "flag --config.model.depth=fifty: invalid literal for int() with base 10: 'fifty'",
    ),
  ],
)
def test_config_override_of_unknown_field_or_wrong_type(override, message, tmp_path):
  result = run_main('--workdir', str(tmp_path / 'run'), override, timeout=120)
  assert_one_line_error(result, 'FATAL Flags parsing error: ' + message)
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_checkpoint_of_another_config(run_copy):
  workdir, before = run_copy
  result = run_main('--workdir', workdir, '--config.model.num_parts=3')
  assert_one_line_error(
    result,
    'cal_jax.main: error: The checkpoint at step 0 in',
    'num_parts: checkpoint=4, config=3',
    'Start a fresh run in another workdir, or use the config that wrote this checkpoint',
  )
  assert snapshot(workdir) == before


def test_batch_not_divisible_by_the_devices(run_copy):
  workdir, before = run_copy
  config = tiny.get_config()
  config.data.num_ids_per_batch = 3
  with pytest.raises(
    ValueError,
    match=re.escape(
      'config.data.num_ids_per_batch=3 must be divisible by num_hosts * local_devices = 1 * 2 = 2'
    ),
  ):
    loop.train_and_evaluate(config, workdir)
  assert snapshot(workdir) == before


def test_pretrained_file_of_another_architecture(tiny_run, tmp_path):
  """Read at a fresh start only (a resumed run has the weights in its checkpoint)."""
  from safetensors.numpy import save_file

  from cal_jax.models import torchvision_weights as pretrained

  workdir = str(tmp_path / 'fresh')
  config = tiny.get_config()
  config.data.manual_dir = os.path.join(tiny_run[1], 'synthetic_data')
  config.data.data_dir = os.path.join(tiny_run[1], 'tfds')
  path = str(tmp_path / 'resnet18.safetensors')
  save_file(
    {
      name: np.zeros(pretrained.torch_shape(target), np.float32)
      for name, target in pretrained.param_mapping(18, config.model.width).items()
    },
    path,
  )
  config.model.pretrained = path
  with pytest.raises(pretrained.CheckpointMismatchError) as error:
    loop.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert path in message and 'looks like a resnet18 checkpoint' in message
  assert 'config.model.depth=18' in message
  assert snapshot(workdir) == {}  # nothing written: no checkpoint, no config.json


# ---------------------------------------------------------------- workdir ---


@pytest.mark.slow
def test_workdir_that_cannot_be_created(tmp_path):
  """A path under a regular file: fails at once, before any data is read."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('keep me')
  result = run_main('--workdir', str(blocker / 'run'))
  assert_one_line_error(
    result,
    f"cal_jax.main: error: cannot create the workdir '{blocker / 'run'}': Not a directory",
    'Choose another --workdir',
  )
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
    with pytest.raises(
      workdir_lib.WorkdirError,
      match=rf"cannot write in the workdir '{re.escape(workdir)}': "
      r'(Read-only file system|Permission denied)\. Choose another',
    ):
      loop.evaluate_checkpoint(tiny.get_config(), workdir)
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
  with pytest.raises(
    workdir_lib.WorkdirError,
    match=rf"the disk of the workdir '{re.escape(workdir)}' has 1\.0 MiB free; "
    r'this run needs about \d+\.\d MiB .*lower config\.keep_checkpoints',
  ):
    loop.train_and_evaluate(tiny.get_config(), workdir)
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


def test_files_written_atomically_are_readable_by_others(tmp_path):
  """The mode of a plain open(): 0666 less the umask (mkstemp alone gives 0600)."""
  old = os.umask(0o022)
  try:
    workdir_lib.write_text_atomically(str(tmp_path / 'a.json'), '{}')
    os.umask(0o077)
    workdir_lib.write_text_atomically(str(tmp_path / 'b.json'), '{}')
  finally:
    os.umask(old)
  assert (tmp_path / 'a.json').stat().st_mode & 0o777 == 0o644
  assert (tmp_path / 'b.json').stat().st_mode & 0o777 == 0o600


# ------------------------------------------------- config values and files ---


def assert_single_line(result, *fragments):
  """One line on stderr (after the libraries' start-up chatter) holds the whole message."""
  assert_one_line_error(result, *fragments)
  last = result.stderr.strip().splitlines()[-1]
  for fragment in fragments:
    assert fragment in last, (fragment, last)


@pytest.mark.slow
@pytest.mark.parametrize(
  'overrides, message',
  [
    (
      ['--config.optim.num_epochs=-1'],
      'config.optim.num_epochs=-1: must be an integer >= 0 (0 evaluates the initial model)',
    ),
    (
      ['--config.log_every_steps=0', '--config.checkpoint_every_steps=0'],
      'config.checkpoint_every_steps=0: must be an integer >= 1; config.log_every_steps=0: must be',
    ),
    (
      ['--config.eval.rand_perm_path=nowhere/rand_perm_cam.mat'],
      "config.eval.rand_perm_path='{repo}/nowhere/rand_perm_cam.mat' does not exist",
    ),
  ],
)
def test_config_value_out_of_range(overrides, message, tmp_path):
  """Refused before the workdir is created or any data read (every rule: test_config_checks)."""
  result = run_main('--workdir', str(tmp_path / 'run'), *overrides, timeout=120)
  assert_single_line(result, 'cal_jax.main: error: ' + message.format(repo=REPO))
  assert not (tmp_path / 'run').exists()


CONFIG_FILES = {
  'syntax': ('def get_config(:\n  pass\n', "', line 1: SyntaxError: invalid syntax"),
  'import': (
    'import no_such_module_here\n',
    "', line 1: importing it failed: ModuleNotFoundError: No module named 'no_such_module_here'",
  ),
  'no_get_config': ('config = None\n', "' has no get_config() function"),
  'raises': (
    'from configs import default\n\ndef get_config():\n  config = default.get_config()\n'
    '  config.data.pad = int("four")\n  return config\n',
    "', line 5: get_config() raised ValueError: invalid literal for int()",
  ),
  'wrong_type': (
    'def get_config():\n  return {"seed": 0}\n',
    "': get_config() returned a dict, not an ml_collections.ConfigDict",
  ),
  'missing_return': (
    'from configs import default\n\ndef get_config():\n  config = default.get_config()\n',
    "': get_config() returned None, not an ml_collections.ConfigDict",
  ),
  'absent': (None, "' does not exist (--config takes the path of a Python file"),
}


@pytest.mark.parametrize('kind', sorted(CONFIG_FILES))
def test_config_file_that_cannot_be_loaded(kind, tmp_path):
  from cal_jax.config import cli

  source, message = CONFIG_FILES[kind]
  path = tmp_path / f'{kind}.py'
  if source is not None:
    path.write_text(source)
  with pytest.raises(cli.ConfigFileError) as error:
    cli.check_config_file(str(path))
  assert str(error.value).startswith(f"config file '{path}" + message), str(error.value)
  assert '\n' not in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['syntax', 'no_get_config', 'wrong_type'])
def test_config_file_that_cannot_be_loaded_through_the_command(kind, tmp_path):
  """The three ways it surfaces in absl's parser: an exception, an AttributeError
  (taken for a misspelt field before), a value of another type."""
  source, message = CONFIG_FILES[kind]
  path = tmp_path / f'{kind}.py'
  path.write_text(source)
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'cal_jax.main',
      '--config',
      str(path),
      '--workdir',
      str(tmp_path / 'run'),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert_single_line(result, f"FATAL Flags parsing error: --config: config file '{path}" + message)
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_config_file_with_a_misspelt_field(tmp_path):
  """A config file may add fields ml_collections knows nothing of: refused, named."""
  path = tmp_path / 'typo.py'
  path.write_text(
    'from configs import tiny\n\ndef get_config():\n  config = tiny.get_config()\n'
    '  config.model.dept = 18\n  return config\n'
  )
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'cal_jax.main',
      '--config',
      str(path),
      '--workdir',
      str(tmp_path / 'run'),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert_single_line(
    result,
    'cal_jax.main: error: config.model.dept: no such field (did you mean config.model.depth?)',
  )


# --------------------------------------------------- split lists, prepared data ---


def test_test_identities_in_the_training_list(sysu_tree, run_copy, tmp_path):
  workdir, before = run_copy
  root = tmp_path / 'SYSU-MM01'
  shutil.copytree(sysu_tree, root)
  test_ids = sorted({r.id for r in records.list_records('sysu', str(root), 'test')})
  (root / 'exp' / 'train_id.txt').write_text(
    (root / 'exp' / 'train_id.txt').read_text().strip() + f',{test_ids[1]}\n'
  )
  with pytest.raises(
    ValueError,
    match=re.escape(
      f'identities listed for both training and test (test identities would be trained on): '
      f'1 ids in both exp/train_id.txt and exp/test_id.txt: {test_ids[1]}'
    ),
  ):
    loop.train_and_evaluate(real_data_config(root, tmp_path / 'tfds'), workdir)
  assert snapshot(workdir) == before


class _CollectInfo(_CollectWarnings):
  def __init__(self, lines):
    super().__init__(lines)
    import logging

    self.handler.setLevel(logging.INFO)

  def __enter__(self):
    import logging

    self.level = self.logger.level
    self.logger.setLevel(logging.INFO)
    super().__enter__()

  def __exit__(self, *args):
    super().__exit__(*args)
    self.logger.setLevel(self.level)


@pytest.mark.slow
def test_manual_dir_that_does_not_exist_beside_data_prepared_earlier(sysu_tree, run_copy, tmp_path):
  """tfds would reuse the prepared copy without looking at manual_dir: refused instead,
  and every run says which prepared data it uses and where it came from."""
  from cal_jax.data import splits as data

  workdir, before = run_copy
  root = tmp_path / 'SYSU-MM01'
  shutil.copytree(sysu_tree, root)
  config = real_data_config(root, tmp_path / 'tfds')
  lines = []
  with _CollectInfo(lines):
    data.load_splits(config, workdir)  # prepared once
  assert any(line.startswith(f'Preparing sysu_mm01 from {root} into ') for line in lines)

  gone = tmp_path / 'unmounted' / 'SYSU-MM01'
  result = run_main(
    '--workdir',
    workdir,
    '--config.data.synthetic=',
    '--config.model.pretrained=none',
    f'--config.data.manual_dir={gone}',
    f'--config.data.data_dir={tmp_path}/tfds',
    timeout=120,
  )
  assert_one_line_error(
    result,
    f"cal_jax.main: error: config.data.manual_dir='{gone}' does not "
    'exist: point it at the folder of sysu_mm01; data prepared from it '
    'earlier is not used without it',
  )
  assert snapshot(workdir) == before
  config.data.manual_dir = str(gone)
  with pytest.raises(FileNotFoundError, match='does not exist'):  # data.load_splits on its own
    data.load_splits(config, workdir)

  moved = tmp_path / 'moved' / 'SYSU-MM01'
  shutil.copytree(root, moved)
  config.data.manual_dir = str(moved)
  lines.clear()
  with _CollectInfo(lines):
    data.load_splits(config, workdir)
  assert any(
    line.startswith('Using sysu_mm01 prepared earlier in ') and f'from {root} ' in line
    for line in lines
  ), lines
  assert any(
    f'was prepared from {root}, not from config.data.manual_dir={moved}: the prepared '
    'copy is used' in line
    for line in lines
  ), lines


# ------------------------------------------------------------- convert output ---


def run_convert(*args, timeout=300):
  return subprocess.run(
    [sys.executable, '-m', 'cal_jax.convert', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.slow
def test_convert_refuses_to_overwrite_without_the_flag(run_copy, tmp_path):
  workdir, before = run_copy
  output = tmp_path / 'cal.safetensors'
  output.write_bytes(b'an earlier export')
  result = run_convert('--workdir', workdir, '--output', str(output))
  assert_single_line(
    result,
    f"cal_jax.convert: error: --output '{output}' exists: pass "
    '--overwrite to replace it, or choose another --output',
  )
  assert output.read_bytes() == b'an earlier export'
  assert snapshot(workdir) == before  # the refused export wrote nothing, not even log.txt
  result = run_convert('--workdir', workdir, '--output', str(output), '--overwrite')
  assert result.returncode == 0, result.stderr[-3000:]
  from cal_jax.interop import torch_model

  assert torch_model.load(str(output)).metadata['checkpoint_step'] == 0
  # A done export adds the libraries' lines to the run's log.txt, and changes nothing else.
  after = snapshot(workdir)
  assert 'log.txt' in after
  assert {k: v for k, v in after.items() if k != 'log.txt'} == before


@pytest.mark.slow
def test_convert_output_that_cannot_be_written(run_copy, tmp_path, monkeypatch):
  """A folder, a path under a file, a read-only disk: refused before the checkpoint is read."""
  from cal_jax.interop import export as convert

  workdir, before = run_copy
  folder = tmp_path / 'exports.safetensors'
  folder.mkdir()
  with pytest.raises(convert.OutputError, match=re.escape(f"--output '{folder}' is a folder")):
    convert.export_checkpoint(workdir, str(folder))
  blocker = tmp_path / 'a_file'
  blocker.write_text('keep me')
  with pytest.raises(
    convert.OutputError,
    match=re.escape(
      f"cannot write --output '{blocker}/sub/cal.pt': '{blocker}' is a file, not a folder"
    ),
  ):
    convert.export_checkpoint(workdir, str(blocker / 'sub' / 'cal.pt'))
  assert blocker.read_text() == 'keep me'

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(convert.tempfile, 'mkstemp', read_only)
  with pytest.raises(
    convert.OutputError,
    match=re.escape(f"cannot write --output '{tmp_path}/cal.pt': Read-only file system"),
  ):
    convert.export_checkpoint(workdir, str(tmp_path / 'cal.pt'))
  assert not (tmp_path / 'cal.pt').exists() and snapshot(workdir) == before
  monkeypatch.undo()
  # Through the command: the same one line.
  result = run_convert('--workdir', workdir, '--output', str(folder))
  assert_single_line(result, f"cal_jax.convert: error: --output '{folder}' is a folder")
  # No data is read: a real-data config without manual_dir exports (partial check).
  config = tiny.get_config()
  config.data.synthetic = config.data.manual_dir = ''
  convert.export_checkpoint(workdir, str(tmp_path / 'real.safetensors'), config=config)
  assert (tmp_path / 'real.safetensors').is_file()


# ------------------------------------------------------------- weight files ---


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def _bad_weight_files(tmp_path):
  """{name: path} of files that must not load: random bytes, inconsistent safetensors
  headers and metadata, a pickle that would run code."""
  import json
  import struct

  import torch

  rng = np.random.default_rng(0)
  files = {}

  def write(name, data):
    files[name] = tmp_path / name
    files[name].write_bytes(data)

  def safetensors_file(name, header, data=b'\0' * 16):
    raw = json.dumps(header).encode()
    write(name, struct.pack('<Q', len(raw)) + raw + data)

  write('random.safetensors', rng.bytes(4096))
  write('random.pt', rng.bytes(4096))
  write('short.safetensors', b'\x01\x02')
  safetensors_file(
    'huge_shape.safetensors',
    {'w': {'dtype': 'F32', 'shape': [2**40, 2**20], 'data_offsets': [0, 16]}},
  )
  safetensors_file(
    'offsets_beyond.safetensors',
    {'w': {'dtype': 'F32', 'shape': [2**30], 'data_offsets': [0, 2**32]}},
  )
  safetensors_file(
    'bad_dtype.safetensors', {'w': {'dtype': 'F128', 'shape': [1], 'data_offsets': [0, 16]}}
  )
  safetensors_file(
    'metadata_not_json.safetensors',
    {
      '__metadata__': {'config': '{depth: 50'},
      'w': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]},
    },
  )
  safetensors_file(
    'config_of_wrong_types.safetensors',
    {
      '__metadata__': {'config': json.dumps({'depth': 'fifty', 'width': -1})},
      'w': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]},
    },
  )
  marker = tmp_path / 'code_ran'
  torch.save({'config': {}, 'state_dict': {'w': _Payload(marker)}}, tmp_path / 'payload.pt')
  files['payload.pt'] = tmp_path / 'payload.pt'
  torch.save({'conv1.weight': _Payload(marker)}, tmp_path / 'payload.pth')
  files['payload.pth'] = tmp_path / 'payload.pth'
  torch.save(
    {'conv1.weight': _Payload(marker)},
    tmp_path / 'legacy_payload.pth',
    _use_new_zipfile_serialization=False,
  )
  files['legacy_payload.pth'] = tmp_path / 'legacy_payload.pth'
  write('random.pth', rng.bytes(4096))
  return files, marker


EXPORTED_FILE_ERRORS = {
  'random.safetensors': 'not a valid .safetensors file (its header claims',
  'short.safetensors': 'not a valid .safetensors file (2 bytes, shorter than the 8-byte',
  'huge_shape.safetensors': "tensor 'w': F32 [1099511627776, 1048576] needs",
  'offsets_beyond.safetensors': "tensor 'w': byte range [0, 4294967296] is not within the 16",
  'bad_dtype.safetensors': "tensor 'w': unknown dtype 'F128'",
  'metadata_not_json.safetensors': "metadata field 'config' is not JSON",
  'config_of_wrong_types.safetensors': "invalid CALInference hyper-parameters: depth='fifty' "
  '(must be one of [18, 34, 50, 101]), width=-1',
  'random.pt': 'not a zip-based torch file, so not written by cal_jax.convert',
  'payload.pt': 'refused to load: the file holds objects other than tensors, whose '
  'unpickling could run code (Trying to load unsupported GLOBAL',
}


def test_exported_files_that_must_not_load(tmp_path):
  """torch_model.load: one message naming the file, no code run, nothing allocated first."""
  from cal_jax.interop import torch_model

  files, marker = _bad_weight_files(tmp_path)
  for name, fragment in EXPORTED_FILE_ERRORS.items():
    with pytest.raises(torch_model.WeightFileError) as error:
      torch_model.load(str(files[name]))
    message = str(error.value)
    assert message.startswith(f'{files[name]}: ') and fragment in message, (name, message)
    assert 'weights_only=False' not in message and 'weights_only` set to `False' not in message
  assert not marker.exists()


PRETRAINED_FILE_ERRORS = {
  'random.safetensors': 'not a valid .safetensors file (its header claims',
  'huge_shape.safetensors': "tensor 'w': F32 [1099511627776, 1048576] needs",
  'offsets_beyond.safetensors': 'byte range [0, 4294967296] is not within',
  'random.pth': 'not a readable torch file (damaged, truncated, or another format)',
  'payload.pth': 'refused to load: the file holds objects other than tensors',
  'legacy_payload.pth': 'refused to load: the file holds objects other than tensors',
}


@pytest.mark.parametrize('name', sorted(PRETRAINED_FILE_ERRORS))
def test_pretrained_files_that_must_not_load(name, tmp_path):
  """config.model.pretrained: a ValueError naming the file (one line from cal_jax.main)."""
  from cal_jax.models import torchvision_weights as pretrained

  files, marker = _bad_weight_files(tmp_path)
  with pytest.raises(ValueError) as error:
    pretrained.load_torchvision_resnet(str(files[name]), 'resnet50')
  message = str(error.value)
  assert message.startswith(f'{files[name]}: ') and PRETRAINED_FILE_ERRORS[name] in message
  assert '\n' not in message and 'weights_only' not in message
  assert not marker.exists()


def test_pretrained_random_bytes_through_training(run_copy, tmp_path):
  """A fresh start reads the file (a resumed run has the weights in its checkpoint)."""
  workdir, before = run_copy
  files, _ = _bad_weight_files(tmp_path)
  config = tiny.get_config()
  config.model.pretrained = str(files['random.pth'])
  config.data.manual_dir = os.path.join(workdir, 'synthetic_data')
  config.data.data_dir = os.path.join(workdir, 'tfds')
  fresh = str(tmp_path / 'fresh')
  with pytest.raises(ValueError, match=re.escape(f'{files["random.pth"]}: not a readable torch')):
    loop.train_and_evaluate(config, fresh)
  assert not os.path.exists(os.path.join(fresh, 'checkpoints', '0'))
  assert snapshot(workdir) == before


# ---------------------------------------------------------------- visualize ---


@pytest.mark.slow
@pytest.mark.parametrize('flag', ['--num_ids=0', '--num_queries=0', '--trial=-1'])
def test_visualize_counts_below_one(flag, run_copy):
  workdir, before = run_copy
  result = subprocess.run(
    [sys.executable, '-m', 'cal_jax.visualize', '--workdir', workdir, flag],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  name, value = flag[2:].split('=')
  assert_single_line(result, f'FATAL Flags parsing error: flag {flag}: {value} is not')
  assert snapshot(workdir) == before
  from cal_jax import visualize

  with pytest.raises(ValueError, match=re.escape(f'--{name}={value}: must be an integer >= ')):
    visualize.draw(tiny.get_config(), workdir, ['regions'], workdir, **{name: int(value)})


# ------------------------------------------- generated weight files (catalogue) ---

STATE_NAMES = ('stem_visible.conv1.weight', 'layer1.0.conv1.weight', 'part_neck.weight', 'w')
CONFIG_VALUES = (0, 1, -1, 3, 64, 512, 2**40, 10**30, 0.5, 1.5, 'x', None, True, [1, 3], [2], [])


def _random_weight_file(rng, path):
  """A file of at most 1 KB whose header or metadata holds random values: random
  hyper-parameters (sizes up to 10**30) and image size, random tensor names,
  dtypes, shapes and byte ranges; a .safetensors, or now and then a .pt."""
  import json
  import struct

  pick = lambda values: values[rng.integers(len(values))]
  keys = ('depth', 'width', 'num_parts', 'pool_sizes', 'adapter_hidden', 'adapter_dim')
  config = {key: pick(CONFIG_VALUES) for key in keys if rng.random() < 0.6}
  if rng.random() < 0.5:
    config.update(depth=18, width=int(pick((8, 64, 512, 4096))))  # valid, and large
  metadata = {'config': json.dumps(config)}
  if rng.random() < 0.3:
    metadata['image_size'] = json.dumps(pick(([10**6, 10**6], [64], 'big', [-1, 2], [64, 32])))
  header, offset = {}, 0
  for _ in range(rng.integers(0, 4)):
    dtype = pick(('F32', 'F16', 'I8', 'BOOL', 'F128'))
    shape = [int(pick((0, 1, 3, 7, 2**31, 2**62))) for _ in range(rng.integers(0, 4))]
    size = int(np.prod(shape, dtype=object)) * {'F32': 4, 'F16': 2}.get(dtype, 1)
    size = size if size <= 64 else int(rng.integers(0, 64))  # claims more than it holds
    header[pick(STATE_NAMES)] = {
      'dtype': dtype,
      'shape': shape,
      'data_offsets': [offset, offset + size],
    }
    offset += size
  if path.suffix == '.pt':
    import torch

    state = {name: torch.zeros(3) for name in header}
    torch.save({'config': config, 'state_dict': state}, path)
    return
  header['__metadata__'] = metadata
  raw = json.dumps(header).encode()
  data = struct.pack('<Q', len(raw)) + raw + bytes(offset)
  if rng.random() < 0.3:  # a few flipped bits anywhere, the length field included
    data = bytearray(data)
    for position in rng.integers(0, len(data), size=3):
      data[position] ^= 1 << int(rng.integers(8))
    data = bytes(data)
  path.write_bytes(data[:1024])


_LOAD_ALL = """
import json, resource, sys
import torch  # noqa: F401
from cal_jax.interop import torch_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
for path in sys.argv[1:]:
  try:
    torch_model.load(path)
    out[path] = 'loaded'
  except torch_model.WeightFileError as error:
    out[path] = 'WeightFileError: ' + str(error)
  except BaseException as error:
    out[path] = f'{type(error).__name__}: {error}'
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({'grown_mb': (after - before) / 1024, 'results': out}))
"""


def test_generated_weight_files_are_refused_before_anything_is_allocated(tmp_path):
  """No file of at most 1 KB loads, each fails in one WeightFileError naming it, and
  loading all of them grows the process's peak memory by less than 100 MB."""
  import json

  rng = np.random.default_rng(34)
  paths = []
  for i in range(60):
    path = tmp_path / f'case{i}.{"pt" if i % 10 == 9 else "safetensors"}'
    _random_weight_file(rng, path)
    paths.append(path)
  # The case of the issue: about 100 bytes whose metadata claims a wide network.
  wide = tmp_path / 'wide.safetensors'
  header = json.dumps(
    {
      '__metadata__': {'config': json.dumps({'depth': 50, 'width': 512})},
      'w': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]},
    }
  ).encode()
  wide.write_bytes(len(header).to_bytes(8, 'little') + header + bytes(4))
  paths.append(wide)
  result = subprocess.run(
    [sys.executable, '-c', _LOAD_ALL, *map(str, paths)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for path in paths:
    outcome = report['results'][str(path)]
    assert outcome.startswith(f'WeightFileError: {path}: '), outcome
    assert '\n' not in outcome, outcome
  assert report['grown_mb'] < 100, report['grown_mb']


# ------------------------------------------- generated config paths (catalogue) ---


def _config_paths(tmp_path, marker):
  """{name: (--config value, fragment of its one line)}: every kind of path but a .py
  config and a run's config.json, most holding code that would create `marker` if run."""
  from cal_jax.config import run_config

  code = f'import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef get_config():\n  pass\n'
  cases = {}
  rng = np.random.default_rng(7)
  suffixes = ['.txt', '', '.yaml', '.cfg', '.py.bak', '.pyc', '.JSONL', '.sh']
  for suffix in suffixes:
    name = f'config_{rng.integers(10**6)}{suffix}'
    (tmp_path / name).write_text(code)
    cases[name] = (str(tmp_path / name), "is neither a Python config (.py) nor a run's config.json")
  for name, content, fragment in (
    ('code.json', code, 'is not JSON'),
    ('list.json', '[1, 2]', "is not a run's config.json"),
    ('partial.json', json.dumps({'model': {}, 'data': {}}), 'it has no loss, optim, eval section'),
    (
      'sections_not_objects.json',
      json.dumps(dict.fromkeys(run_config.RUN_CONFIG_SECTIONS, 1)),
      'as a JSON object',
    ),
  ):
    (tmp_path / name).write_text(content)
    cases[name] = (str(tmp_path / name), fragment)
  (tmp_path / 'a_folder.py').mkdir()
  cases['folder'] = (str(tmp_path / 'a_folder.py'), 'is a folder')
  cases['absent'] = (str(tmp_path / 'nowhere.py'), 'does not exist')
  os.symlink(cases[next(iter(cases))][0], tmp_path / 'link_to_text.py.txt')
  cases['symlink'] = (str(tmp_path / 'link_to_text.py.txt'), 'is neither a Python config')
  return cases


_PARSE_ALL = """
import json, sys
from absl import app
from cal_jax import main  # its flags
from cal_jax.config import cli
workdir, first, *values = sys.argv[1:]
out = {}
for value in values:
  try:
    cli.parse_flags(['cal_jax.main', '--config', value, '--workdir', workdir])
    out[value] = 'parsed'
  except SystemExit as error:
    out[value] = str(error.code)
print(json.dumps(out), flush=True)
# Then as `python -m cal_jax.main --config FIRST --workdir WORKDIR` runs: its exit status.
sys.argv = ['cal_jax.main', '--config', first, '--workdir', workdir]
app.run(main.main, flags_parser=cli.parse_flags)
"""


def test_generated_config_paths_are_refused_before_they_run(run_copy, tmp_path):
  """Each kind of file that is not a Python config or a run's config.json: one line
  naming it (the function and absl's parser of the command), nothing of it run, the
  workdir as it was; then through the command itself, exit 1."""
  from cal_jax.config import cli

  workdir, before = run_copy
  marker = tmp_path / 'code_ran'
  cases = _config_paths(tmp_path, marker)
  for name, (value, fragment) in cases.items():
    with pytest.raises(cli.ConfigFileError) as error:
      cli.check_config_file(value)
    message = str(error.value)
    assert message.startswith(f'config file {value!r}') and fragment in message, (name, message)
    assert '\n' not in message
  values = [value for value, _ in cases.values()]
  text = next(value for value in values if value.endswith('.txt'))
  result = subprocess.run(
    [sys.executable, '-c', _PARSE_ALL, workdir, text, *values],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for name, (value, fragment) in cases.items():
    line = report[value]
    assert line.startswith(f'FATAL Flags parsing error: --config: config file {value!r}'), line
    assert fragment in line and '\n' not in line, (name, line)
  assert_single_line(result, f'--config: config file {text!r} is neither a Python config')
  assert not marker.exists() and snapshot(workdir) == before


def test_config_json_of_a_run_is_read_as_data(run_copy, tmp_path):
  """A run's config.json is a --config: read as JSON, never run, equal to the run's
  config (so resuming and evaluating the run with it are allowed)."""
  from cal_jax.config import checks as config_checks
  from cal_jax.config import cli
  from cal_jax.runtime import workdir as workdir_lib

  workdir, before = run_copy
  path = os.path.join(workdir, 'config.json')
  assert cli.config_file_kind(path) == 'run'
  cli.check_config_file(path)
  config = cli.RunConfigParser(name='config').parse(path)
  assert config.is_locked
  with open(path) as f:
    assert json.loads(config.to_json_best_effort()) == json.load(f)
  config_checks.check_config(config)
  workdir_lib.check_config_unchanged(workdir, config)
  assert snapshot(workdir) == before


def test_config_file_whose_get_config_exits(tmp_path):
  """A sys.exit in a config file is no silent success (it exited with status 0)."""
  from cal_jax.config import cli

  path = tmp_path / 'exits.py'
  path.write_text('import sys\n\ndef get_config():\n  sys.exit(0)\n')
  with pytest.raises(cli.ConfigFileError, match=r'line 4: get_config\(\) exited \(SystemExit: 0\)'):
    cli.check_config_file(str(path))


@pytest.mark.slow
def test_config_file_whose_get_config_exits_through_the_command(tmp_path):
  path = tmp_path / 'exits.py'
  path.write_text('import sys\n\ndef get_config():\n  sys.exit(0)\n')
  result = subprocess.run(
    [sys.executable, '-m', 'cal_jax.main', '--config', str(path), '--workdir', str(tmp_path / 'r')],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert_single_line(result, f"--config: config file '{path}', line 4: get_config() exited")
  assert not (tmp_path / 'r').exists()


# ------------------------------------------- generated damaged checkpoint steps ---


def _small_state(seed):
  """A small train state with a momentum optimiser: quick to save and restore, and with
  a kernel large enough (128 KB) that Orbax stores it in a data file of its own."""
  import optax

  from cal_jax.training.state import TrainState

  rng = np.random.default_rng(seed)
  return TrainState.create(
    apply_fn=None,
    params={'dense': {'kernel': rng.normal(size=(512, 64)).astype(np.float32)}},
    tx=optax.sgd(0.1, momentum=0.9),
    batch_stats={'mean': np.full((3,), seed, np.float32)},
  ).replace(step=np.asarray(seed, np.int32))


@pytest.fixture(scope='module')
def two_steps(tmp_path_factory):
  """A checkpoint folder with intact steps 1 and 2, step 2 evaluated (its metrics)."""
  from cal_jax.training.checkpointing import Checkpointer

  directory = tmp_path_factory.mktemp('two_steps') / 'checkpoints'
  with Checkpointer(str(directory), tiny.get_config(), 8) as checkpointer:
    checkpointer.save(1, _small_state(1), {'step': 1})
    checkpointer.save(2, _small_state(2), {'step': 2})
    checkpointer.wait_until_finished()
    checkpointer.record_metrics(2, {'mAP': 0.5})
  return directory


def _flip_or_remove(rng, step_dir, keep_manifest):
  """One random bit flipped, or one random file removed, in `step_dir`. Returns
  (what was done, the file)."""
  from cal_jax.training import checkpoint_files

  if not keep_manifest:  # as a SIGKILL right after the commit leaves it
    (step_dir / checkpoint_files.MANIFEST).unlink()
  files = sorted(p for p in step_dir.rglob('*') if p.is_file())
  if rng.random() < 0.3:
    victim = files[rng.integers(len(files))]
    victim.unlink()
    return 'removed', victim
  # A random bit of a random file, or of the step (a file hit in proportion to its size,
  # as by a disk error: most often the data file of the arrays).
  sizes = np.array([p.stat().st_size for p in files], float)
  weights = sizes / sizes.sum() if rng.random() < 0.5 else (sizes > 0) / (sizes > 0).sum()
  victim = files[rng.choice(len(files), p=weights)]
  data = bytearray(victim.read_bytes())
  data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
  victim.write_bytes(bytes(data))
  return 'flipped', victim


@pytest.mark.parametrize('keep_manifest', [True, False], ids=['manifest', 'no_manifest'])
def test_generated_damage_of_a_checkpoint_step_is_never_loaded_silently(
  two_steps, keep_manifest, tmp_path
):
  """Random bit flips and missing files in the latest step, with and without its
  manifest: restoring the latest either gives exactly what step 2 saved, or falls
  back to step 1 with one warning naming step 2 and a file of it; read-only, so the
  folder is left as it was."""
  import jax

  from cal_jax.training.checkpointing import Checkpointer

  rng = np.random.default_rng(1 if keep_manifest else 2)
  outcomes = []
  for case in range(12):
    directory = tmp_path / f'case{case}'
    shutil.copytree(two_steps, directory)
    done, victim = _flip_or_remove(rng, directory / '2', keep_manifest)
    before = snapshot(directory)
    lines = []
    with _CollectWarnings(lines):
      with Checkpointer(str(directory), tiny.get_config(), 8, read_only=True) as reader:
        state, extra = reader.restore(_small_state(0))
    step = extra['step']
    assert step in (1, 2), (done, victim, extra)
    for got, saved in zip(
      jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(_small_state(step))
    ):  # what was loaded is exactly what was saved as that step
      np.testing.assert_array_equal(np.asarray(got), np.asarray(saved), err_msg=f'{done} {victim}')
    if step == 2:  # loaded: unwarned
      assert not [line for line in lines if 'checkpoint of step' in line], lines
      outcomes.append('intact')
    else:
      damaged = [line for line in lines if 'The checkpoint of step 2 in' in line]
      assert len(damaged) == 1 and 'is damaged: ' in damaged[0], (done, victim, lines)
      assert 'using step 1, the newest intact one' in damaged[0] and '\n' not in damaged[0]
      assert str(directory / '2') in damaged[0], damaged[0]
      outcomes.append('fell back')
    assert snapshot(directory) == before
  # With the manifest every file is covered: only removing the manifest itself (the
  # digests then check the step) can leave the step loadable.
  if keep_manifest:
    assert outcomes.count('intact') <= 1
  assert 'fell back' in outcomes


def test_damaged_metrics_file_is_named_and_stepped_over(two_steps, tmp_path):
  """The metrics entry of a step, read by orbax before any check: evaluation falls
  back to the intact step (read-only, nothing moved); training moves the step aside."""
  from cal_jax.training.checkpointing import Checkpointer

  directory = tmp_path / 'checkpoints'
  shutil.copytree(two_steps, directory)
  metrics = directory / '2' / 'metrics' / 'metrics'
  metrics.write_text('{"mAP": 0.')
  before = snapshot(directory)
  lines = []
  with _CollectWarnings(lines):
    with Checkpointer(str(directory), tiny.get_config(), 8, read_only=True) as reader:
      _, extra = reader.restore(_small_state(0))
  assert extra == {'step': 1} and snapshot(directory) == before
  assert any(f'step 2 in {directory} is damaged: {metrics} cannot be read' in x for x in lines)
  lines.clear()
  with _CollectWarnings(lines):
    with Checkpointer(str(directory), tiny.get_config(), 8) as checkpointer:
      assert checkpointer.all_steps() == [1]
  assert (tmp_path / 'checkpoints.damaged' / '2' / 'metrics' / 'metrics').is_file()
  assert any(f'step 2 in {directory} is damaged: {metrics} cannot be read' in x for x in lines)


def test_eval_of_a_workdir_without_checkpoints_prepares_no_data(tmp_path):
  """--mode eval looks for a checkpoint first: no synthetic data generated, nothing prepared."""
  workdir = tmp_path / 'empty'
  workdir.mkdir()
  with pytest.raises(FileNotFoundError, match=re.escape(f'no checkpoint in {workdir}/checkpoints')):
    loop.evaluate_checkpoint(tiny.get_config(), str(workdir))
  assert not {'synthetic_data', 'tfds'} & set(os.listdir(workdir)), os.listdir(workdir)


def test_eval_of_a_step_that_does_not_exist_is_named_before_the_data(run_copy, tmp_path):
  workdir, before = run_copy
  config = tiny.get_config()
  config.data.manual_dir = str(tmp_path / 'not_generated')  # generated if the data were read
  with pytest.raises(
    FileNotFoundError, match=re.escape(f'no checkpoint of step {10**20} in {workdir}/checkpoints; ')
  ):
    loop.evaluate_checkpoint(config, workdir, 10**20)
  assert not (tmp_path / 'not_generated').exists() and snapshot(workdir) == before


def test_read_only_data_dir_names_its_config_field(run_copy, tmp_path, monkeypatch):
  """Preparing into a folder that cannot be written: the error names config.data.data_dir."""
  from cal_jax.data import splits as data

  workdir, before = run_copy
  config = tiny.get_config()
  config.data.manual_dir = os.path.join(workdir, 'synthetic_data')
  config.data.data_dir = str(tmp_path / 'read_only')

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(data.tempfile, 'mkstemp', read_only)
  with pytest.raises(
    workdir_lib.WorkdirError,
    match=re.escape(
      f"cannot write in '{tmp_path / 'read_only'}', the folder config.data.data_dir chose"
    )
    + r'.*Read-only file system\. Set config\.data\.data_dir to a writable folder',
  ):
    data.load_splits(config, workdir)
  assert snapshot(workdir) == before


def test_visualize_trial_and_protocol_checked_against_the_data_set(run_copy):
  """Before the checkpoint is read: a trial beyond the gallery draws, an unknown protocol."""
  from cal_jax import visualize

  workdir, before = run_copy
  config = tiny.get_config()
  trials = int(config.eval.num_trials)
  with pytest.raises(
    ValueError,
    match=re.escape(
      f'--trial={10**12}: sysu_mm01 is evaluated on {trials} gallery draw(s) '
      f'(config.eval.num_trials); choose --trial from 0 to {trials - 1}'
    ),
  ):
    visualize.draw(config, workdir, ['ranking'], workdir, trial=10**12)
  with pytest.raises(
    ValueError, match=r"--protocol='sysu/all/triple' is not a protocol of sysu_mm01"
  ):
    visualize.draw(config, workdir, ['ranking'], workdir, protocol='sysu/all/triple')
  assert snapshot(workdir) == before


def test_convert_writes_files_others_can_read(run_copy, tmp_path):
  """0666 less the umask, as the run's other files (safetensors alone wrote 0600)."""
  from cal_jax.interop import export as convert

  workdir, before = run_copy
  old = os.umask(0o022)
  try:
    convert.export_checkpoint(workdir, str(tmp_path / 'cal.safetensors'))
  finally:
    os.umask(old)
  assert (tmp_path / 'cal.safetensors').stat().st_mode & 0o777 == 0o644
  assert snapshot(workdir) == before
