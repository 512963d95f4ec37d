"""The live collapse guard (`cal_jax.training.collapse`): its rule on hand-made statistics,
and on real runs of the tiny config: Eq. 18 as written warns while it trains, the measured
variant does not."""

import os
import subprocess
import sys

import pytest

from cal_jax.training.collapse import CollapseGuard
from configs import sysu, tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stats(max_s, distinct=1.0):
  return {'attention_max': max_s, 'attention_distinct': distinct, 'loss': 1.0}


def test_warns_once_after_three_collapsed_intervals_in_a_row():
  guard = CollapseGuard(sysu.get_config().loss)
  sequence = [0.2, 0.95, 0.99, 0.5, 0.91, 0.92, 0.97, 0.99, 1.0]
  said = [guard.update(step, stats(m)) for step, m in enumerate(sequence)]
  # The interval at 0.5 resets the count; the third in a row after it is step 6.
  assert [i for i, line in enumerate(said) if line] == [6]
  assert 'collapsed by step 6: attention_max 0.97' in said[6]
  assert 'attention_distinct 1.00' in said[6]
  assert guard.update(9, stats(1.0)) is None  # once per run


def test_never_warns_at_or_below_the_threshold():
  guard = CollapseGuard(sysu.get_config().loss)
  assert all(guard.update(s, stats(0.9, 4.0)) is None for s in range(20))


def test_the_remedy_names_the_switches_that_are_on():
  paper = CollapseGuard(sysu.get_config().loss).remedy()
  assert 'config.loss.kd1=0' in paper and 'config.loss.kd2_attention_gradient=False' in paper
  assert '--config.formulation=measured' in paper
  only_kd1 = tiny.get_config().loss
  only_kd1.kd1, only_kd1.kd1_form = 1.0, 'dot'
  text = CollapseGuard(only_kd1).remedy()
  assert 'config.loss.kd1=0' in text and 'kd2_attention_gradient' not in text
  assert 'Neither' in CollapseGuard(tiny.get_config().loss).remedy()


def train_tiny(workdir, *flags):
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'cal_jax.main',
      '--config',
      os.path.join(REPO, 'configs', 'tiny.py'),
      '--workdir',
      str(workdir),
      '--config.eval.enabled=False',
      '--config.optim.num_epochs=4',  # 16 steps, a log line every 2
      *flags,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
    check=True,
  )


@pytest.mark.slow
def test_eq18_as_written_warns_while_training_and_the_measured_variant_does_not(tmp_path):
  paper = train_tiny(tmp_path / 'paper', '--config.formulation=paper')
  warnings = [line for line in paper.stderr.splitlines() if 'TSAA attention has collapsed' in line]
  assert len(warnings) == 1, paper.stderr[-3000:]
  assert 'WARNING: ' in warnings[0] and 'config.loss.kd1=0' in warnings[0]
  # While it trains: before the last step's line.
  lines = paper.stderr.splitlines()
  assert lines.index(warnings[0]) < next(i for i, s in enumerate(lines) if 'step 16/16' in s)
  measured = train_tiny(tmp_path / 'measured')
  assert 'collapsed' not in measured.stderr, measured.stderr[-3000:]
  assert 'step 16/16' in measured.stderr
