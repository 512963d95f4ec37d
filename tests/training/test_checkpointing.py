"""Checkpointer: round trip, retention, atomicity, and the compatibility check."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import NUM_CLASSES

from cal_jax.training import checkpoint_files, checkpointing
from cal_jax.training.checkpointing import Checkpointer, IncompatibleCheckpointError
from cal_jax.training.state import TrainState

REPO = pathlib.Path(__file__).resolve().parents[2]
TMP_SUFFIX = '.orbax-checkpoint-tmp'


def perturbed(state: TrainState, seed: int) -> TrainState:
  """`state` on the host (numpy leaves, as the loop saves it), every array leaf
  replaced by random values of its shape and dtype, and the step set to `seed`."""
  rng = np.random.default_rng(seed)

  def fill(x):
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer):
      return rng.integers(0, 1000, size=x.shape).astype(x.dtype)
    return rng.normal(size=x.shape).astype(x.dtype)

  host = jax.tree_util.tree_map(fill, jax.device_get(state))
  return host.replace(step=np.asarray(seed, np.int32))


def small_state(seed: int = 0, size: int = 4) -> TrainState:
  """A two-leaf train state with a momentum optimiser: quick to save."""
  rng = np.random.default_rng(seed)
  params = {'dense': {'kernel': rng.normal(size=(size, 3)).astype(np.float32)}}
  state = TrainState.create(
    apply_fn=None,
    params=params,
    tx=optax.sgd(0.1, momentum=0.9),
    batch_stats={'mean': np.full((3,), seed, np.float32)},
  )
  return state.replace(step=np.asarray(seed, np.int32))


def assert_trees_equal(actual, expected):
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for a, b in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def committed_steps(directory) -> list[int]:
  """The steps orbax itself lists, read without cleaning anything up."""
  manager = ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
  )
  steps = sorted(manager.all_steps())
  manager.close()
  return steps


def save_steps(checkpointer, maps: dict[int, float | None]) -> None:
  for step, mean_ap in maps.items():
    metrics = None if mean_ap is None else {'mAP': mean_ap, 'rank1': 2 * mean_ap}
    assert checkpointer.save(step, small_state(step), {'step': step}, metrics)


def test_fingerprint_is_plain_json(tiny_config):
  fingerprint = checkpointing.compatibility_fingerprint(tiny_config, NUM_CLASSES)
  assert set(fingerprint) == set(checkpoint_files.FINGERPRINT_FIELDS) | {'num_classes'}
  assert fingerprint['pool_sizes'] == [1, 3, 5]
  assert fingerprint['num_classes'] == NUM_CLASSES
  assert fingerprint['depth'] == tiny_config.model.depth


def test_round_trip(tmp_path, tiny_config, tiny_state):
  saved = perturbed(tiny_state, seed=7)
  extra = {
    'data_step': 7,
    'epoch': 1,
    'assignment_counts': np.arange(4, dtype=np.int64),
    'rng_seed': np.int32(3),
    'ratios': (0.5, 0.25),
  }
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES) as checkpointer:
    assert checkpointer.latest_step() is None
    assert checkpointer.save(7, saved, extra)
  # A fresh process would see exactly this: a new Checkpointer on the directory.
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES) as checkpointer:
    assert checkpointer.latest_step() == 7
    restored, restored_extra = checkpointer.restore(tiny_state)
  assert int(restored.step) == 7
  for name in ('params', 'batch_stats', 'opt_state'):
    assert_trees_equal(getattr(restored, name), getattr(saved, name))
  assert restored.apply_fn is tiny_state.apply_fn and restored.tx is tiny_state.tx
  assert restored_extra == {
    'data_step': 7,
    'epoch': 1,
    'assignment_counts': [0, 1, 2, 3],
    'rng_seed': 3,
    'ratios': [0.5, 0.25],
  }


def test_keeps_last_n_and_best(tmp_path, tiny_config):
  maps = {1: 0.1, 2: 0.5, 3: 0.3, 4: None, 5: 0.2, 6: None}
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES, keep=2) as checkpointer:
    save_steps(checkpointer, maps)
    checkpointer.wait_until_finished()
    assert checkpointer.latest_step() == 6
    assert checkpointer.best_step() == 2
    assert checkpointer.all_steps() == [2, 5, 6]
  assert committed_steps(tmp_path) == [2, 5, 6]
  # The best step and its metrics survive a restart, and a better one replaces it.
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES, keep=2) as checkpointer:
    assert checkpointer.best_step() == 2
    save_steps(checkpointer, {7: 0.9, 8: None, 9: None})
    checkpointer.wait_until_finished()
    assert checkpointer.best_step() == 7
    assert checkpointer.all_steps() == [7, 8, 9]
    state, extra = checkpointer.restore(small_state(), step=7)
    assert extra == {'step': 7}
    assert_trees_equal(state.params, small_state(7).params)


def test_keep_best_false_keeps_only_the_last(tmp_path, tiny_config):
  with Checkpointer(
    str(tmp_path), tiny_config, NUM_CLASSES, keep=2, keep_best=False
  ) as checkpointer:
    save_steps(checkpointer, {1: 0.9, 2: 0.1, 3: 0.2, 4: None})
    checkpointer.wait_until_finished()
    assert checkpointer.all_steps() == [3, 4]
    assert checkpointer.latest_step() == 4
    assert checkpointer.best_step() == 3


def test_save_refuses_old_steps_and_metrics_without_map(tmp_path, tiny_config):
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES) as checkpointer:
    save_steps(checkpointer, {5: None})
    assert not checkpointer.save(5, small_state(5), {})
    assert not checkpointer.save(3, small_state(3), {})
    with pytest.raises(ValueError, match='mAP'):
      checkpointer.save(6, small_state(6), {}, metrics={'rank1': 0.5})
    with pytest.raises(TypeError):
      checkpointer.save(6, small_state(6), {'not json': object()})
    assert checkpointer.all_steps() == [5]


def test_missing_checkpoint(tmp_path, tiny_config):
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES) as checkpointer:
    assert checkpointer.latest_step() is None
    assert checkpointing.committed_steps(str(tmp_path)) == []
    with pytest.raises(FileNotFoundError, match='No complete checkpoint'):
      checkpointer.restore(small_state())
    save_steps(checkpointer, {2: None})
    checkpointer.wait_until_finished()
    with pytest.raises(FileNotFoundError, match=r'committed steps are \[2\]'):
      checkpointer.restore(small_state(), step=3)
    state, extra = checkpointer.restore(small_state())
    assert extra == {'step': 2}
    assert checkpointing.committed_steps(str(tmp_path)) == [2]
    assert checkpointing.saved_meta(str(tmp_path), 2)['extra'] == {'step': 2}


def test_half_written_checkpoint_is_ignored(tmp_path, tiny_config):
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES) as checkpointer:
    save_steps(checkpointer, {1: None, 2: None})
  # What a kill mid-save leaves: a partial copy under orbax's temporary names.
  partial = tmp_path / f'3{TMP_SUFFIX}'
  shutil.copytree(tmp_path / '2', partial)
  for path in sorted(partial.rglob('*')):
    if path.is_file():
      path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
  (tmp_path / f'4{TMP_SUFFIX}-1700000000').mkdir()
  assert committed_steps(tmp_path) == [1, 2]
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES) as checkpointer:
    assert checkpointer.latest_step() == 2
    state, extra = checkpointer.restore(small_state())
    assert extra == {'step': 2}
    assert_trees_equal(state.params, small_state(2).params)
    # Saving goes on after the good step; the leftovers were cleared on opening.
    save_steps(checkpointer, {3: None})
  assert sorted(p.name for p in tmp_path.iterdir() if TMP_SUFFIX in p.name) == []
  assert committed_steps(tmp_path) == [1, 2, 3]


def test_incompatible_config_is_refused(tmp_path, tiny_config):
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES) as checkpointer:
    save_steps(checkpointer, {1: None})
  other = tiny_config.copy_and_resolve_references()
  other.model.depth = 18
  other.model.num_parts = 3
  with Checkpointer(str(tmp_path), other, NUM_CLASSES + 1) as checkpointer:
    with pytest.raises(IncompatibleCheckpointError) as error:
      checkpointer.restore(small_state())
  message = str(error.value)
  assert 'depth: checkpoint=50, config=18' in message
  assert 'num_parts: checkpoint=4, config=3' in message
  assert f'num_classes: checkpoint={NUM_CLASSES}, config={NUM_CLASSES + 1}' in message
  assert 'width' not in message
  # The advice is read by main, search and convert alike, so it names no
  # command-line flag that one of them lacks.
  advice = message.splitlines()[-1]
  assert advice == (
    'Start a fresh run in another workdir, or use the config that wrote this checkpoint.'
  )
  assert '--' not in message
  assert isinstance(error.value, ValueError)
  # Settings outside the fingerprint (loss weights, learning rate) may change.
  retuned = tiny_config.copy_and_resolve_references()
  retuned.loss.pcl = 0.5
  retuned.optim.base_lr = 1.0
  with Checkpointer(str(tmp_path), retuned, NUM_CLASSES) as checkpointer:
    _, extra = checkpointer.restore(small_state())
  assert extra == {'step': 1}


def test_close_waits_for_the_async_save(tmp_path, tiny_config):
  big = small_state(seed=3, size=1 << 20)
  checkpointer = Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES, async_save=True)
  assert checkpointer.save(3, big, {'step': 3})
  checkpointer.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['3']
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES) as checkpointer:
    state, _ = checkpointer.restore(small_state(size=1 << 20))
  assert_trees_equal(state.params, big.params)


_KILLED_MID_SAVE = textwrap.dedent("""
  import os, sys
  import numpy as np, optax
  from configs import tiny
  from cal_jax.training.checkpointing import Checkpointer
  from cal_jax.training.state import TrainState

  def state(seed, size):
    kernel = np.random.default_rng(seed).normal(size=(size, 3)).astype(np.float32)
    params = {'dense': {'kernel': kernel}}
    return TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1, momentum=0.9),
                             batch_stats={'mean': np.full((3,), seed, np.float32)})

  checkpointer = Checkpointer(sys.argv[1], tiny.get_config(), 8, async_save=True)
  checkpointer.save(1, state(1, 1 << 20), {'step': 1})
  checkpointer.wait_until_finished()
  checkpointer.save(2, state(2, 1 << 23), {'step': 2})
  os._exit(0)  # killed: no close(), the background write of step 2 dies with us
""")


@pytest.mark.slow
def test_killed_during_async_save(tmp_path, tiny_config):
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(REPO)] + os.environ.get('PYTHONPATH', '').split(os.pathsep)),
  )
  subprocess.run(
    [sys.executable, '-c', _KILLED_MID_SAVE, str(tmp_path)],
    cwd=REPO,
    env=env,
    check=True,
    timeout=120,
    capture_output=True,
  )
  leftovers = [p.name for p in tmp_path.iterdir() if TMP_SUFFIX in p.name]
  steps = committed_steps(tmp_path)
  assert steps in ([1], [1, 2])
  if leftovers:
    assert steps == [1]
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES) as checkpointer:
    latest = checkpointer.latest_step()
    size = {1: 1 << 20, 2: 1 << 23}[latest]
    state, extra = checkpointer.restore(small_state(size=size))
  assert extra == {'step': latest}
  assert_trees_equal(state.params, small_state(latest, size=size).params)


def test_metrics_recorded_after_the_save_count_for_the_best_step(tmp_path, tiny_config):
  """The loop saves a step, then evaluates it: `record_metrics` makes it a candidate
  for BestN as if `save` had been given the metrics, also after a restart."""
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES, keep=2) as checkpointer:
    save_steps(checkpointer, {1: None, 2: None})
    checkpointer.record_metrics(1, {'mAP': 0.9})
    assert not checkpointer.has_metrics(2) and checkpointer.has_metrics(1)
    save_steps(checkpointer, {3: None, 4: None})
    checkpointer.wait_until_finished()
    assert checkpointer.all_steps() == [1, 3, 4]
    assert checkpointer.best_step() == 1
    with pytest.raises(ValueError, match='finite'):
      checkpointer.record_metrics(4, {'mAP': float('nan')})
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES, keep=2) as checkpointer:
    assert checkpointer.best_step() == 1
    save_steps(checkpointer, {5: None})
    checkpointer.wait_until_finished()
    assert checkpointer.all_steps() == [1, 4, 5]


def test_damaged_step_named_with_its_file(tmp_path, tiny_config):
  """Each committed step carries a list of its files (size, CRC-32): a truncated or
  overwritten file is named; restoring the latest skips to the newest intact step."""
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES) as checkpointer:
    save_steps(checkpointer, {1: None, 2: None})
  listed = json.loads((tmp_path / '2' / checkpoint_files.MANIFEST).read_text())
  assert 'state/manifest.ocdbt' in listed and 'meta/metadata' in listed
  data = max(
    (p for p in (tmp_path / '2').rglob('*') if p.is_file() and p.parent.name == 'd'),
    key=lambda p: p.stat().st_size,
  )
  data.write_bytes(b'\0' * data.stat().st_size)
  with Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES) as checkpointer:
    assert checkpointer.damage(1) is None
    assert checkpointer.damage(2) == (f'{data} does not hold what was written (checksum differs)')
    with pytest.raises(
      checkpointing.DamagedCheckpointError, match=rf'step 2 in .* is damaged: {data} does not hold'
    ):
      checkpointer.restore(small_state(), step=2)
    state, extra = checkpointer.restore(small_state())  # the latest intact: 1, left in place
    assert extra == {'step': 1}
    assert checkpointer.all_steps() == [1, 2]
    (tmp_path / '1' / 'meta' / 'metadata').unlink()
    with pytest.raises(
      checkpointing.DamagedCheckpointError,
      match=r'every checkpoint in .* is damaged: step 2: .*; step 1: .*'
      r'meta/metadata is missing',
    ):
      checkpointer.restore(small_state())


def test_close_raises_the_first_error_not_the_manager_s_own(tmp_path, tiny_config, monkeypatch):
  """A save that failed fails Orbax's close again; the error reported is the first (the
  one-line full disk), not the second, raw one."""
  import errno

  checkpointer = Checkpointer(str(tmp_path), tiny_config, NUM_CLASSES)
  save_steps(checkpointer, {1: None})

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(checkpointer._manager, 'wait_until_finished', full)
  monkeypatch.setattr(checkpointer._manager, 'close', full)
  with pytest.raises(
    checkpointing.workdir_lib.WorkdirError, match='the checkpoint of step 1 could'
  ):
    checkpointer.close()
