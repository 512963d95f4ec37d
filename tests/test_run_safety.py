"""What happens to a run's workdir around the train step: the order of saving and
evaluating, signals, crashes, a second run on the same workdir, a changed config,
damaged checkpoints, a disk that fills up during a save, a pretrained file that is
gone, and relative paths typed from another directory.

The train step itself is faked (`fake_training.py`: the state's step counter
advances, nothing is compiled) wherever what is tested is the loop around it;
where the case is about the command, `python tests/fake_training.py ARGS` is
`python -m cal_jax.main ARGS` with that step. Most cases start from a copy of
the shared tiny run (`tiny_run`: config.json and the checkpoint of step 0).
"""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import fake_training
import pytest

from cal_jax.config import checks as config_checks
from cal_jax.evaluation import run as evaluation_run
from cal_jax.runtime import workdir as workdir_lib
from cal_jax.training import checkpoint_files, checkpointing, loop
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')
FAKE_MAIN = os.path.join(REPO, 'tests', 'fake_training.py')
FAKE_STEP = fake_training.fake_make_p_train_step
TMP_MARKER = checkpoint_files.TMP_MARKER


def run_command(args, *, fake=True, env_extra=None, cwd=REPO, timeout=300):
  command = [sys.executable] + ([FAKE_MAIN] if fake else ['-m', 'cal_jax.main']) + args
  return subprocess.run(
    command,
    cwd=cwd,
    env=dict(os.environ, **(env_extra or {})),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def assert_one_line_error(result, *fragments, status=1):
  assert result.returncode == status, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in result.stderr, (fragment, result.stderr[-3000:])


def steps_on_disk(workdir):
  """The committed steps (folder names) and anything orbax left half-written."""
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  return (sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARKER in n))


@pytest.fixture
def run_copy(tiny_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run[1], workdir)
  return workdir


def quiet_config(**changes):
  """The tiny run's config without the final evaluation (an evaluation-only change)."""
  config = tiny.get_config()
  config.eval.enabled = False
  for field, value in changes.items():
    section, name = field.split('.')
    config[section][name] = value
  return config


class Warnings:
  """absl warnings collected while in the `with` block."""

  def __init__(self):
    self.lines, self.logger = [], logging.getLogger('absl')
    self.handler = logging.Handler(logging.WARNING)
    self.handler.emit = lambda record: self.lines.append(record.getMessage())

  def __enter__(self):
    self.logger.addHandler(self.handler)
    return self.lines

  def __exit__(self, *args):
    self.logger.removeHandler(self.handler)


# ------------------------------------------------ save, then evaluate ---


def test_failing_final_evaluation_keeps_the_final_checkpoint(run_copy, monkeypatch):
  """The last step is saved before it is evaluated; the rerun evaluates it without
  training again, and records its mAP for the best-checkpoint policy."""

  def broken(*args, **kwargs):
    raise RuntimeError('the evaluation broke')

  monkeypatch.setattr(evaluation_run, 'evaluate_state', broken)
  with pytest.raises(RuntimeError, match='the evaluation broke'):
    loop.train_and_evaluate(tiny.get_config(), run_copy, make_step=FAKE_STEP)
  assert steps_on_disk(run_copy) == ([0, 4, 8], [])

  monkeypatch.undo()

  def no_training(config, devices=None):
    del config, devices
    return lambda *args: pytest.fail('trained again')

  results = loop.train_and_evaluate(tiny.get_config(), run_copy, make_step=no_training)
  with open(os.path.join(run_copy, 'eval_results.json')) as f:
    assert json.load(f)['meta']['checkpoint_step'] == 8
  with checkpointing.Checkpointer(
    os.path.join(run_copy, 'checkpoints'), tiny.get_config(), 12
  ) as checkpointer:
    assert checkpointer.has_metrics(8) and checkpointer.best_step() == 8
  with open(os.path.join(run_copy, 'checkpoints', '8', 'metrics', 'metrics')) as f:
    assert json.load(f) == {'mAP': evaluation_run.primary_map(results)}


# ------------------------------------------------------------- signals ---


@pytest.mark.slow
def test_sigint_saves_the_current_step_and_exits_130(run_copy):
  args = ['--config', TINY, '--workdir', run_copy, '--config.eval.enabled=False']
  result = run_command(args, env_extra={'FAKE_SIGNAL_AT': '3', 'FAKE_SIGNAL': 'INT'})
  assert_one_line_error(
    result,
    f'cal_jax.main: stopped by SIGINT after step 3; its checkpoint '
    f'is saved in {run_copy}/checkpoints. Run the same command again to '
    'resume.',
    status=130,
  )
  assert 'KeyboardInterrupt' not in result.stderr
  assert steps_on_disk(run_copy) == ([0, 3], [])
  resumed = run_command(args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from step 3' in resumed.stderr
  assert steps_on_disk(run_copy) == ([3, 4, 8], [])


# ------------------------------------------------------------- crashes ---


@pytest.mark.slow
@pytest.mark.parametrize('where', ['train_step', 'background_save'])
def test_a_crash_keeps_its_traceback_and_leaves_no_partial_checkpoint(run_copy, where):
  """A bug is no user error: its traceback stays. What a failed save left is removed,
  and the same command then resumes from the last committed step."""
  args = ['--config', TINY, '--workdir', run_copy, '--config.eval.enabled=False']
  if where == 'train_step':
    code = (
      'import functools, sys, fake_training; from absl import app; from cal_jax import main; '
      'from cal_jax.config import cli; from cal_jax.training import loop\n'
      'loop.train_and_evaluate = functools.partial(loop.train_and_evaluate, make_step=lambda c: '
      'fake_training.fake_make_p_train_step(c, fail_at=6))\n'
      'sys.argv[0] = "cal_jax.main"; app.run(main.main, flags_parser=cli.parse_flags)'
    )
    crashed = subprocess.run(
      [sys.executable, '-c', code] + args,
      cwd=REPO,
      text=True,
      capture_output=True,
      timeout=300,
      env=dict(os.environ, PYTHONPATH=os.path.join(REPO, 'tests')),
    )
    message = 'RuntimeError: injected bug in step call 6'
  else:
    crashed = run_command(args, env_extra={'FAKE_FAIL_SAVE_AT': '8', 'FAKE_FAIL': 'bug'})
    message = 'RuntimeError: injected bug while writing'
  assert crashed.returncode == 1, crashed.stderr[-3000:]
  assert 'Traceback' in crashed.stderr and message in crashed.stderr, crashed.stderr[-3000:]
  assert steps_on_disk(run_copy) == ([0, 4], [])
  resumed = run_command(args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from step 4' in resumed.stderr
  assert steps_on_disk(run_copy) == ([0, 4, 8], [])


# ------------------------------------------------------------------ lock ---


@pytest.mark.slow
def test_second_run_on_a_workdir_names_the_first_and_a_killed_ones_lock_is_taken_over(
  run_copy, tmp_path
):
  args = ['--config', TINY, '--workdir', run_copy, '--config.eval.enabled=False']
  hold = str(tmp_path / 'holding')
  first = subprocess.Popen(
    [sys.executable, FAKE_MAIN] + args,
    cwd=REPO,
    text=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    env=dict(os.environ, FAKE_HOLD_AT='2', FAKE_HOLD_FILE=hold),
  )
  try:
    for _ in range(1200):  # the first run is in its step 2, holding the lock
      if os.path.exists(hold) or first.poll() is not None:
        break
      subprocess.run(['sleep', '0.1'], check=True)
    assert os.path.exists(hold), 'the first run did not reach step 2'
    second = run_command(args, timeout=120)
    assert_one_line_error(
      second,
      f"cal_jax.main: error: the workdir '{run_copy}' is in use by "
      f'another run: pid {first.pid} on host {socket.gethostname()}',
      'Wait for it to end or stop it, or choose another --workdir',
    )
  finally:
    first.kill()
    first.wait()
  # SIGKILL: no cleanup; the lock file still names the dead process ...
  with open(os.path.join(run_copy, workdir_lib.LOCK_FILE)) as f:
    assert f.read().startswith(f'pid {first.pid} on host')
  third = run_command(args)  # ... and the next run takes over at once
  assert third.returncode == 0, third.stderr[-3000:]
  assert not os.path.exists(os.path.join(run_copy, workdir_lib.LOCK_FILE))
  assert steps_on_disk(run_copy)[0][-1] == 8


# ------------------------------------------------------- changed config ---


@pytest.mark.slow
def test_resuming_with_another_config_is_refused_naming_the_fields(run_copy):
  with open(os.path.join(run_copy, 'config.json'), 'rb') as f:
    before = f.read()
  result = run_command(
    [
      '--config',
      TINY,
      '--workdir',
      run_copy,
      '--config.optim.base_lr=0.5',
      '--config.loss.pcl=0.25',
      '--config.eval.num_trials=1',
    ],
    fake=False,
  )
  assert_one_line_error(
    result,
    f"cal_jax.main: error: the workdir '{run_copy}' was trained with another config",
    'differing: loss.pcl: run=1.0, now=0.25; '
    'optim.base_lr: run=0.1, now=0.5. Resume with the config that trained '
    'it, or start another --workdir',
  )
  assert 'num_trials' not in result.stderr
  with open(os.path.join(run_copy, 'config.json'), 'rb') as f:
    assert f.read() == before
  assert steps_on_disk(run_copy) == ([0], [])


def test_evaluation_only_and_path_fields_may_change_on_resume(run_copy):
  config = tiny.get_config()
  config.eval.num_trials, config.data.eval_batch_size = 1, 7
  config.data.eval_flip, config.model.embedding = True, 'global'
  config.log_every_steps, config.checkpoint_every_steps, config.keep_checkpoints = 1, 1, 9
  config.data.manual_dir, config.model.pretrained = '/moved/data', '/gone/resnet50.pth'
  workdir_lib.check_config_unchanged(run_copy, config)  # nothing raised
  config.data.num_pos = 3
  with pytest.raises(workdir_lib.ConfigChangedError, match=r'data\.num_pos: run=2, now=3\. '):
    workdir_lib.check_config_unchanged(run_copy, config)


# --------------------------------------------------- damaged checkpoints ---


def _largest_data_file(step_dir):
  files = [
    os.path.join(folder, name)
    for folder, _, names in os.walk(step_dir)
    for name in names
    if f'{os.sep}d' in folder
  ]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def _zero(step_dir):
  path = _largest_data_file(step_dir)
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.write(b'\0' * size)
  return path


def _drop_state(step_dir):  # a half-copied step folder
  shutil.rmtree(os.path.join(step_dir, 'state'))
  return os.path.join(step_dir, 'state', '_METADATA')


def _drop_manifest(step_dir):
  path = os.path.join(step_dir, 'state', 'manifest.ocdbt')
  os.remove(path)
  return path


def _truncate_unlisted(step_dir):
  """As a run killed right after the commit leaves it: no file list to check against,
  so the damage shows when the state is read."""
  os.remove(os.path.join(step_dir, checkpoint_files.MANIFEST))
  _truncate(step_dir)
  return os.path.join(step_dir, 'state') + ' cannot be read ('


@pytest.mark.parametrize(
  'damage', [_truncate, _zero, _drop_state, _drop_manifest, _truncate_unlisted]
)
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(
  run_copy, monkeypatch, damage
):
  """Training resumes from step 4 when step 8 is damaged, with one warning naming the
  step and the file; the damaged step is moved aside, not deleted."""
  loop.train_and_evaluate(quiet_config(), run_copy, make_step=FAKE_STEP)
  assert steps_on_disk(run_copy) == ([0, 4, 8], [])
  damaged_file = damage(os.path.join(run_copy, 'checkpoints', '8'))
  with Warnings() as warnings:
    loop.train_and_evaluate(quiet_config(), run_copy, make_step=FAKE_STEP)
  aside = os.path.join(run_copy, 'checkpoints.damaged', '8')
  [line] = [w for w in warnings if 'checkpoints is damaged' in w]
  assert line.startswith(
    f'The checkpoint of step 8 in {run_copy}/checkpoints is damaged: {damaged_file}'
  ), line
  assert line.endswith(f'using step 4, the newest intact one (moved to {aside}).'), line
  assert os.path.isdir(aside)
  assert steps_on_disk(run_copy) == ([0, 4, 8], [])  # 5..8 trained again


# ------------------------------------------------------------ full disk ---


@pytest.mark.slow
def test_full_disk_during_a_save_is_one_line_naming_the_disk(run_copy):
  args = ['--config', TINY, '--workdir', run_copy, '--config.eval.enabled=False']
  result = run_command(args, env_extra={'FAKE_FAIL_SAVE_AT': '8', 'FAKE_FAIL': 'enospc'})
  assert_one_line_error(
    result,
    'cal_jax.main: error: No space left on device: the disk mounted at',
    f'(holding {run_copy}/checkpoints) has ',
    ' MiB free; the '
    'checkpoint of step 8 could not be written and its partial copy was '
    'removed. The checkpoints of steps [0, 4] are intact',
  )
  assert steps_on_disk(run_copy) == ([0, 4], [])
  with open(os.path.join(run_copy, 'config.json')) as f:
    assert json.load(f)['data']['num_pos'] == 2


# ------------------------------------------------------ pretrained file ---


def test_pretrained_file_is_only_needed_by_a_fresh_start(run_copy, tiny_run, tmp_path, monkeypatch):
  gone = str(tmp_path / 'moved_away' / 'resnet50.pth')
  loop.train_and_evaluate(
    quiet_config(**{'model.pretrained': gone}),
    run_copy,  # resumes
    make_step=FAKE_STEP,
  )
  assert steps_on_disk(run_copy) == ([0, 4, 8], [])
  results = loop.evaluate_checkpoint(quiet_config(**{'model.pretrained': gone}), run_copy)
  assert 'sysu/all/single' in results
  fresh = str(tmp_path / 'fresh')
  data = os.path.join(tiny_run[1], 'synthetic_data'), os.path.join(tiny_run[1], 'tfds')
  with pytest.raises(config_checks.ConfigError, match=gone):  # before anything is read
    loop.train_and_evaluate(
      quiet_config(
        **{'model.pretrained': gone, 'data.manual_dir': data[0], 'data.data_dir': data[1]}
      ),
      fresh,
    )
  assert not os.path.exists(os.path.join(fresh, 'checkpoints', '0'))


# -------------------------------------------------------- relative paths ---


@pytest.mark.slow
def test_relative_paths_from_another_directory(tmp_path):
  """main, convert and visualize started outside the repository, with relative
  --config, --workdir, --output and data paths: everything lands where they point."""
  cwd = tmp_path / 'elsewhere'
  cwd.mkdir()
  config = os.path.relpath(TINY, cwd)
  trained = run_command(
    [
      '--config',
      config,
      '--workdir',
      'runs/tiny',
      '--config.optim.num_epochs=1',
      '--config.eval.enabled=False',
      '--config.data.manual_dir=data/synthetic',
      '--config.data.data_dir=data/tfds',
    ],
    fake=False,
    cwd=cwd,
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert steps_on_disk(cwd / 'runs' / 'tiny') == ([4], [])
  assert (cwd / 'data' / 'synthetic' / 'cam1').is_dir()
  with open(cwd / 'runs' / 'tiny' / 'config.json') as f:
    assert json.load(f)['data']['manual_dir'] == str(cwd / 'data' / 'synthetic')

  converted = subprocess.run(
    [
      sys.executable,
      '-m',
      'cal_jax.convert',
      '--workdir',
      'runs/tiny',
      '--output',
      'export/tiny.safetensors',
    ],
    cwd=cwd,
    text=True,
    capture_output=True,
    timeout=300,
  )
  assert converted.returncode == 0, converted.stderr[-3000:]
  assert (cwd / 'export' / 'tiny.safetensors').stat().st_size > 0
  drawn = subprocess.run(
    [
      sys.executable,
      '-m',
      'cal_jax.visualize',
      '--workdir',
      'runs/tiny',
      '--what',
      'regions',
      '--output',
      'pictures',
    ],
    cwd=cwd,
    text=True,
    capture_output=True,
    timeout=300,
  )
  assert drawn.returncode == 0, drawn.stderr[-3000:]
  assert drawn.stdout.split() == [str(cwd / 'pictures' / 'regions.png')]
  assert (cwd / 'pictures' / 'regions.png').stat().st_size > 0
