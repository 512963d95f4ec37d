"""cal_jax.runtime.distributed without a second process: when to start the runtime, and the shares.

The cross-process paths themselves (collectives, gather, barriers) run in test_multihost.py.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cal_jax.runtime import distributed

SLURM_STEP = {
  'SLURM_JOB_ID': '77',
  'SLURM_STEP_NODELIST': 'node[001-002]',
  'SLURM_NTASKS': '2',
  'SLURM_PROCID': '1',
  'SLURM_LOCALID': '0',
}


@pytest.mark.parametrize(
  'options, environ, tpu_vm, expected',
  [
    (distributed.Options(), {}, False, False),  # a laptop: never waits for a coordinator
    (distributed.Options(), SLURM_STEP, False, True),
    (distributed.Options(), dict(SLURM_STEP, SLURM_NTASKS='1'), False, False),
    (
      distributed.Options(),
      {
        k: v
        for k, v in SLURM_STEP.items()  # sbatch shell, outside srun
        if k != 'SLURM_STEP_NODELIST'
      },
      False,
      False,
    ),
    (distributed.Options(), {}, True, True),  # Cloud TPU VM
    (distributed.Options(), {'TPU_WORKER_HOSTNAMES': 'w0,w1'}, False, True),  # GKE
    (
      distributed.Options(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=0),
      {},
      False,
      True,
    ),
    (distributed.Options(mode='never'), SLURM_STEP, True, False),
    (distributed.Options(mode='always'), {}, False, True),
  ],
)
def test_should_initialize(options, environ, tpu_vm, expected):
  start, reason = distributed.should_initialize(options, environ, tpu_vm)
  assert start == expected, reason
  assert reason


@pytest.mark.parametrize(
  'kwargs, message',
  [
    ({'mode': 'sometimes'}, 'distributed mode'),
    ({'coordinator_address': '127.0.0.1:1', 'num_processes': 2}, 'go together'),
    ({'coordinator_address': '127.0.0.1:1', 'num_processes': 2, 'process_id': 2}, r'\[0, '),
    ({'num_processes': 2, 'process_id': 0}, 'need --coordinator_address'),
  ],
)
def test_inconsistent_flags_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.Options(**kwargs)


@pytest.fixture
def recorded_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(distributed, 'on_cloud_tpu_vm', lambda: False)
  return calls


def test_loopback_coordinator_binds_loopback_only(recorded_initialize):
  options = distributed.Options(
    coordinator_address='127.0.0.1:4321', num_processes=2, process_id=1, local_device_ids=(0, 1)
  )
  assert distributed.initialize(options, environ={})
  (call,) = recorded_initialize
  assert call['coordinator_bind_address'] == '127.0.0.1:4321'
  assert (call['num_processes'], call['process_id'], call['local_device_ids']) == (2, 1, [0, 1])


def test_remote_coordinator_keeps_jax_binding(recorded_initialize):
  options = distributed.Options(coordinator_address='10.1.2.3:4321', num_processes=4, process_id=0)
  assert distributed.initialize(options, environ={})
  assert 'coordinator_bind_address' not in recorded_initialize[0]


def test_plain_run_does_not_initialize(recorded_initialize):
  assert not distributed.initialize(distributed.Options(), environ={})
  assert not recorded_initialize


@pytest.mark.parametrize('num_items', [1, 2, 5, 8, 9])
@pytest.mark.parametrize('num_processes', [1, 2, 3, 4])
def test_process_slices_are_equal_and_give_back_every_index_once(num_items, num_processes):
  indices = np.arange(100, 100 + num_items)
  shares = [distributed.process_slice(indices, num_processes, p) for p in range(num_processes)]
  assert len({len(s) for s in shares}) == 1 and len(shares[0]) >= 1
  np.testing.assert_array_equal(np.concatenate(shares)[:num_items], indices)


def test_one_process_gathers_nothing():
  indices = np.array([4, 9, 2])
  rows = distributed.split_and_gather(lambda i: np.stack([i, 2 * i], axis=1), indices)
  np.testing.assert_array_equal(rows, [[4, 8], [9, 18], [2, 4]])


@pytest.mark.slow
def test_main_refuses_inconsistent_flags_before_anything_runs(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'cal_jax.main',
      '--config',
      'configs/tiny.py',
      '--workdir',
      str(workdir),
      '--num_processes=2',
      '--process_id=0',
    ],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1
  assert 'cal_jax.main: error: --num_processes and --process_id need --coordinator_address' in (
    result.stderr
  )
  assert not workdir.exists()
