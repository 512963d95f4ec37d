"""`cal_jax.ablate` on a cluster: `--emit commands`, `--emit slurm`, and `--collect`.

The emitted commands are run here one after another and collected into the table the
sequential grid (`tiny_grid`, tests/conftest.py) made of the same rows, seeds and config.
The SLURM array script cannot run here (no cluster): its dry run prints the srun command
of each task, which is compared with the run it should train.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import TINY_GRID_FLAGS

from cal_jax.config import ablations

pytestmark = pytest.mark.slow  # every test here runs a command in a subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')
TABLE_FILES = ('ablation.json', 'ablation.md', 'ablation.png')


def ablate(*args, timeout=120):
  return subprocess.run(
    [sys.executable, '-m', 'cal_jax.ablate', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def expected_run(workdir, row, seed, *extra):
  """Run (row, seed) of a grid as `cal_jax.main` must be given it, written out here."""
  row_flags = [
    f'--config.{field}={value}' for field, value in ablations.ROWS[row].overrides.items()
  ]
  return [
    *('--config', TINY, '--workdir', os.path.join(workdir, row, f'seed_{seed}')),
    f'--config.seed={seed}',
    *extra,
    *row_flags,
  ]


def test_emitted_commands_then_collect_give_the_sequential_table(tiny_grid, tmp_path):
  _, sequential, _ = tiny_grid
  workdir = str(tmp_path / "cluster grid's")  # a space and a quote: the lines are quoted
  emitted = ablate(*TINY_GRID_FLAGS, '--workdir', workdir, '--emit', 'commands')
  assert emitted.returncode == 0, emitted.stderr
  lines = emitted.stdout.splitlines()
  with open(os.path.join(workdir, 'ablate_commands.txt')) as f:
    assert f.read().splitlines() == lines
  assert [shlex.split(line) for line in lines] == [
    [sys.executable, '-m', 'cal_jax.main', *expected_run(workdir, row, 0, TINY_GRID_FLAGS[-1])]
    for row in ('baseline', 'full')
  ]
  assert 'afterwards, the table: ' in emitted.stderr and '--collect' in emitted.stderr
  assert not any(os.path.exists(os.path.join(workdir, f)) for f in TABLE_FILES)
  for line in lines:  # as another scheduler would: each line as is, from the repository root
    done = subprocess.run(line, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
  collected = ablate(*TINY_GRID_FLAGS, '--workdir', workdir, '--collect')
  assert collected.returncode == 0, collected.stderr
  assert 'training' not in collected.stdout and '| Baseline (ID loss) | 1 |' in collected.stdout
  # Exactly equal: the same program on the same inputs and the same two CPU devices; the
  # tiny config trains deterministically there (XLA's CPU reductions are ordered), so any
  # difference in a metric is a different run, not noise.
  for name in ('ablation.json', 'ablation.md'):
    with open(os.path.join(workdir, name)) as a, open(sequential / name) as b:
      assert a.read() == b.read(), name
  with open(os.path.join(workdir, 'ablation.json')) as f:
    rows = json.load(f)['rows']
  assert list(rows) == ['baseline', 'full'] and rows['full']['seeds'] == 1
  assert os.path.getsize(os.path.join(workdir, 'ablation.png')) > 1000


@pytest.mark.parametrize('gpus', ['2', '8'])
def test_each_array_task_runs_its_run_through_slurm_sbatch(tmp_path, gpus):
  workdir = str(tmp_path / "grid 'b'")
  extra = ['--config.data.manual_dir=/data/a b', '--config.eval.pictures=False']
  flags = ['--config', 'configs/tiny.py', '--rows', 'tca,full', '--first_seed', '1', '--seeds', '2']
  emitted = ablate(*flags, *extra, '--workdir', workdir, '--emit', 'slurm')
  assert emitted.returncode == 0, emitted.stderr
  script = os.path.join(workdir, 'ablate_array.sbatch')
  assert f'submit: sbatch {shlex.quote(script)}' in emitted.stdout
  with open(script) as f:
    text = f.read()
  assert '#SBATCH --array=0-3\n' in text and '#SBATCH --nodes=1\n' in text
  # The rest as launch/slurm.sbatch asks for each node, its 2 nodes and output file left out.
  assert '#SBATCH --gpus-per-node=8\n#SBATCH --cpus-per-task=16\n' in text
  assert '--nodes=2' not in text and 'cal_jax-%j.out' not in text
  assert '#SBATCH --output' not in text  # a space in the workdir: SLURM's default file
  # A stand-in for srun that prints what it is given: the task as sbatch would start it.
  (tmp_path / 'bin').mkdir()
  (tmp_path / 'bin' / 'srun').write_text('#!/bin/sh\nprintf "%s\\n" srun "$@"\n')
  (tmp_path / 'bin' / 'srun').chmod(0o755)
  runs = [(row, seed) for seed in (1, 2) for row in ('tca', 'full')]  # seed-major, as ablate
  for task, (row, seed) in enumerate(runs):
    device_ids = ','.join(str(i) for i in range(int(gpus)))
    expected = [
      *('srun', '--kill-on-bad-exit=1', '--ntasks-per-node=1', sys.executable),
      *('-m', 'cal_jax.main', '--distributed=always', f'--local_device_ids={device_ids}'),
      *expected_run(workdir, row, seed, *extra),
    ]
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task), GPUS_PER_NODE=gpus)
    dry = subprocess.run(
      ['bash', script, '--dry-run'],
      cwd=tmp_path,  # the script finds the repository itself
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert shlex.split(dry.stdout) == expected, task
    env['PATH'] = f'{tmp_path / "bin"}{os.pathsep}{env["PATH"]}'
    ran = subprocess.run(['bash', script], env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == expected, task
  past = subprocess.run(
    ['bash', script, '--dry-run'],
    env=dict(os.environ, SLURM_ARRAY_TASK_ID='4'),
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert past.returncode == 2 and 'no run 4' in past.stderr and not past.stdout
  if shutil.which('shellcheck'):
    checked = subprocess.run(['shellcheck', script], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout


def test_collect_names_the_missing_run_and_writes_nothing(tiny_grid, tmp_path):
  _, sequential, _ = tiny_grid
  workdir = tmp_path / 'grid'
  workdir.mkdir()
  shutil.copytree(sequential / 'baseline', workdir / 'baseline')  # full, seed 0 is missing
  collected = ablate(*TINY_GRID_FLAGS, '--workdir', str(workdir), '--collect')
  assert collected.returncode == 1
  error = collected.stderr.strip().splitlines()
  assert len(error) == 1, error
  run = str(workdir / 'full' / 'seed_0')
  command = [
    *(sys.executable, '-m', 'cal_jax.main'),
    *expected_run(str(workdir), 'full', 0, TINY_GRID_FLAGS[-1]),
  ]
  assert error[0] == (
    f'cal_jax.ablate: error: --collect: row full, seed 0 is not finished (no '
    f'eval_results.json in {run}); train it with: {shlex.join(command)}'
  )
  assert sorted(os.listdir(workdir)) == ['baseline']
  # Emitted again, the grid names its finished run and the array of the others.
  emitted = ablate(*TINY_GRID_FLAGS, '--workdir', str(workdir), '--emit', 'slurm')
  assert emitted.returncode == 0, emitted.stderr
  script = shlex.quote(str(workdir / 'ablate_array.sbatch'))
  assert '\n1 finished already: tasks 0\n' in emitted.stdout
  assert f'\nto train only the others: sbatch --array=1 {script}\n' in emitted.stdout
  # A finished run trained with another config is refused as the sequential grid refuses it.
  shutil.copytree(sequential / 'full', workdir / 'full')
  changed = ablate(
    *TINY_GRID_FLAGS, '--workdir', str(workdir), '--collect', '--config.loss.pcl=0.5'
  )
  assert changed.returncode == 1
  assert changed.stderr.startswith('cal_jax.ablate: error: row full, seed 0:')
  assert 'loss.pcl: run=1.0, now=0.5' in changed.stderr
  assert not any((workdir / name).exists() for name in TABLE_FILES)
