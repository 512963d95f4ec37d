"""The scripts of launch/: shellcheck, --help, --dry-run, and local.sh's failure handling.

The TPU and SLURM scripts cannot run here (no gcloud, no cluster): only what they would run
is checked. local.sh is run for real with a stand-in interpreter, and on the real program in
test_multihost.py.
"""

import os
import shutil
import subprocess
import time

import pytest

pytestmark = pytest.mark.slow  # every test here runs a command in a subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
SCRIPTS = ['local.sh', 'tpu_pod.sh', 'slurm.sbatch']


def run(script, *args, env_extra=None, timeout=60):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run(
    ['bash', os.path.join(LAUNCH, script), *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize('script', SCRIPTS)
def test_shellcheck(script):
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed')
  result = subprocess.run(
    ['shellcheck', os.path.join(LAUNCH, script)], capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize('script', SCRIPTS)
def test_help(script):
  result = run(script, '--help')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('Usage:')
  assert '--dry-run' in result.stdout


def test_local_dry_run_gives_each_process_its_id():
  result = run(
    'local.sh',
    '--dry-run',
    '-n',
    '3',
    '-d',
    '2',
    '-p',
    '5555',
    '--',
    '--config',
    'configs/tiny.py',
    '--workdir',
    '/tmp/w',
  )
  lines = result.stdout.strip().splitlines()
  assert result.returncode == 0 and len(lines) == 3
  for i, line in enumerate(lines):
    assert '--coordinator_address=127.0.0.1:5555 --num_processes=3' in line
    assert f'--process_id={i} --config configs/tiny.py --workdir /tmp/w' in line
    assert 'xla_force_host_platform_device_count=2' in line


def test_local_refuses_unknown_options():
  result = run('local.sh', '--workdir', '/tmp/w')
  assert result.returncode == 2
  assert 'after --' in result.stderr


def fake_python(tmp_path, body):
  """A stand-in for the interpreter: a shell script that gets local.sh's arguments."""
  path = tmp_path / 'python'
  path.write_text('#!/bin/sh\n' + body + '\n')
  path.chmod(0o755)
  return str(path)


def test_local_stops_the_others_when_one_fails(tmp_path):
  python = fake_python(tmp_path, 'case "$*" in *--process_id=1*) exit 3 ;; esac\nexec sleep 60')
  start = time.monotonic()
  result = run(
    'local.sh',
    '-q',
    '-n',
    '2',
    '-p',
    '5555',
    '-l',
    str(tmp_path / 'logs'),
    '--',
    env_extra={'PYTHON': python},
  )
  assert result.returncode == 3
  assert time.monotonic() - start < 30  # process 0 was stopped, not waited for
  assert 'exited with status 3' in result.stderr


def test_local_time_limit(tmp_path):
  python = fake_python(tmp_path, 'exec sleep 60')
  start = time.monotonic()
  result = run(
    'local.sh',
    '-q',
    '-n',
    '2',
    '-p',
    '5555',
    '-t',
    '2',
    '-l',
    str(tmp_path / 'logs'),
    '--',
    env_extra={'PYTHON': python},
  )
  assert result.returncode == 124  # timeout's status
  assert time.monotonic() - start < 30


def test_tpu_pod_dry_run_creates_copies_runs_on_all_workers_and_deletes():
  result = run(
    'tpu_pod.sh',
    '--tpu',
    'cal-v4',
    '--zone',
    'us-central2-b',
    '--spot',
    '--delete',
    '--dry-run',
    '--',
    '--config',
    'configs/sysu.py',
    '--workdir',
    '/mnt/w',
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith(
    'gcloud compute tpus tpu-vm create cal-v4 --zone=us-central2-b --accelerator-type=v4-32'
  )
  assert lines[0].endswith('--spot')
  assert any(' scp ' in line and '--worker=all' in line for line in lines)
  run_line = lines[-2]
  assert ' ssh cal-v4 ' in run_line and '--worker=all' in run_line
  assert 'cal_jax.main\\ --distributed=always\\ --config\\ configs/sysu.py' in run_line
  assert lines[-1] == 'gcloud compute tpus tpu-vm delete cal-v4 --zone=us-central2-b --quiet'


def test_tpu_pod_needs_name_and_zone():
  result = run('tpu_pod.sh', '--dry-run', '--zone', 'us-central2-b')
  assert result.returncode == 2
  assert '--tpu and --zone are required' in result.stderr


@pytest.mark.parametrize(
  'gpus, ids',
  [({'GPUS_PER_NODE': '4'}, '0\\,1\\,2\\,3'), ({'SLURM_GPUS_PER_NODE': 'a100:2'}, '0\\,1')],
)
def test_slurm_dry_run_one_task_per_node_with_its_gpus(gpus, ids):
  result = run(
    'slurm.sbatch', '--dry-run', '--config', 'configs/sysu.py', '--workdir', '/w', env_extra=gpus
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == (
    'srun --kill-on-bad-exit=1 --ntasks-per-node=1 python3 -m cal_jax.main '
    f'--distributed=always --local_device_ids={ids} --config configs/sysu.py --workdir /w'
  )
