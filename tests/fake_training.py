"""`python tests/fake_training.py ARGS...`: `python -m cal_jax.main ARGS...` with a fake
train step (no compilation: the state's step counter advances, nothing else), for the
tests of what the loop does around the step (saving, stopping, locking, errors).

Environment variables inject what the tests need:
  FAKE_SIGNAL_AT=N, FAKE_SIGNAL=INT|TERM   the process receives the signal during step N
  FAKE_FAIL_SAVE_AT=N, FAKE_FAIL=enospc|bug   the background write of step N's checkpoint
                                              fails (orbax's JSON item) with ENOSPC, or
                                              with a RuntimeError (a bug)
  FAKE_HOLD_AT=N, FAKE_HOLD_FILE=PATH     during step N, write PATH and sleep 120 s
"""

import errno
import functools
import os
import signal
import sys
import time

import numpy as np

from cal_jax.training import loop
from cal_jax.training.step import SCALARS


def fake_make_p_train_step(config, devices=None, *, fail_at=None):
  """A stand-in for `step.make_p_train_step`: (state, batch, key) -> (state, metrics)
  with the state's step advanced and finite metrics; raises a RuntimeError at call
  `fail_at`."""
  del devices
  num_assignments = int(np.prod(np.arange(1, config.model.num_parts + 1)))
  calls = []

  def step(state, batch, key):
    del key
    calls.append(1)
    if fail_at is not None and len(calls) == fail_at:
      raise RuntimeError(f'injected bug in step call {len(calls)}')
    devices = batch['label'].shape[0]
    metrics = {term: np.ones(devices) for term in SCALARS}
    metrics['assignment_counts'] = np.zeros((devices, num_assignments), np.int32)
    metrics['bad_pairs'] = np.zeros(devices)
    return state.replace(step=state.step + 1), metrics

  return step


def _injected(config, devices=None):
  step = fake_make_p_train_step(config, devices)
  signal_at = int(os.environ.get('FAKE_SIGNAL_AT', 0))
  hold_at = int(os.environ.get('FAKE_HOLD_AT', 0))
  calls = []

  def injected(state, batch, key):
    calls.append(1)
    out = step(state, batch, key)
    if len(calls) == signal_at:
      os.kill(os.getpid(), getattr(signal, 'SIG' + os.environ.get('FAKE_SIGNAL', 'INT')))
    if len(calls) == hold_at:
      with open(os.environ['FAKE_HOLD_FILE'], 'w') as f:
        f.write(str(os.getpid()))
      time.sleep(120)
    return out

  return injected


def _fail_saves():
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

  at, kind = os.environ['FAKE_FAIL_SAVE_AT'], os.environ.get('FAKE_FAIL', 'enospc')
  save = handler.JsonCheckpointHandler._save_fn

  async def failing(self, x, directory):
    if f'{os.sep}{at}.orbax-checkpoint-tmp' in str(directory):
      if kind == 'enospc':
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
      raise RuntimeError(f'injected bug while writing {directory}')
    return await save(self, x, directory)

  handler.JsonCheckpointHandler._save_fn = failing


if __name__ == '__main__':
  from absl import app

  from cal_jax import main  # noqa: E402
  from cal_jax.config import cli  # noqa: E402

  # The command line's loop, with the fake step injected.
  loop.train_and_evaluate = functools.partial(loop.train_and_evaluate, make_step=_injected)
  if os.environ.get('FAKE_FAIL_SAVE_AT'):
    _fail_saves()
  sys.argv[0] = 'cal_jax.main'
  app.run(main.main, flags_parser=cli.parse_flags)
