"""The evaluation's progress lines (`cal_jax.evaluation.progress`) on a fake clock, and
through `evaluate` on a fake embedding."""

import numpy as np

from cal_jax.evaluation.progress import Progress


class Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_a_line_when_due_with_rate_and_eta_and_one_at_the_end():
  clock, lines = Clock(), []
  progress = Progress('embedding infrared images', 1000, 'images', lines.append, 10.0, clock)
  clock.now += 4
  progress.update(100)  # not due yet
  assert lines == []
  clock.now += 6  # 10 s in, 250 done: 25 images/s, 750 left: 30 s
  progress.update(250)
  assert lines == ['embedding infrared images 250/1,000 (25%)  25 images/s  ETA 30s']
  clock.now += 5
  progress.update(400)  # 5 s after the last line: not due
  clock.now += 25  # 40 s in
  progress.update(1000)
  assert lines[-1] == 'embedding infrared images 1,000/1,000 (100%)  25 images/s  ETA 0s'
  assert len(lines) == 2


def test_quick_work_stays_quiet_and_slow_rates_keep_their_decimals():
  clock, lines = Clock(), []
  progress = Progress('protocol sysu/all/single: trial', 10, 'trials', lines.append, 10.0, clock)
  for done in range(1, 11):
    clock.now += 0.5
    progress.update(done)
  assert lines == []  # 5 s in all: no line
  slow = Progress('embedding visible images', 3, 'images', lines.append, 10.0, clock)
  clock.now += 12
  slow.update(1)  # 1 image in 12 s: not "0 images/s"
  assert lines == ['embedding visible images 1/3 (33%)  0.083 images/s  ETA 24s']


def test_every_zero_reports_each_update_and_a_host_share_sets_its_total():
  clock, lines = Clock(), []
  progress = Progress('embedding visible images', 8, 'images', lines.append, 0.0, clock)
  for done in (2, 4):
    clock.now += 1
    progress.update(done, total=4)
  assert [line.split('  ')[0] for line in lines] == [
    'embedding visible images 2/4 (50%)',
    'embedding visible images 4/4 (100%)',
  ]
  assert np.isclose(float(lines[0].split('  ')[1].split()[0]), 2.0)  # 2 images in 1 s
