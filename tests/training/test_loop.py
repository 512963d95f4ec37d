"""The training loop and the command line, on the tiny config and its synthetic data.

The command-line runs are real subprocesses of `python -m cal_jax.main`;
the interrupted ones are killed with SIGKILL right after a checkpoint commits,
or sent SIGTERM by the test mid-run.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, 'configs', 'tiny.py')
# Shared by the runs below: the tiny config's data, and no final evaluation.
COMMON = ['--config.eval.enabled=False']

# Run as `python -c`: cal_jax.main, except that the process kills itself
# (SIGKILL: no cleanup, no atexit) once the checkpoint of step KILL_AT is on disk.
KILLING_MAIN = textwrap.dedent("""
    import os, signal, sys
    from absl import app
    from cal_jax import main
    from cal_jax.training import checkpointing
    kill_at = int(os.environ['KILL_AT'])
    save = checkpointing.Checkpointer.save
    def save_then_die(self, step, *args, **kwargs):
      saved = save(self, step, *args, **kwargs)
      if step == kill_at:
        self.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
      return saved
    checkpointing.Checkpointer.save = save_then_die
    sys.argv[0] = 'cal_jax.main'
    app.run(main.main)
""")


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs share compiled initialisation and embedding (the train step, which calls
  back to the host, cannot be cached)."""
  os.environ['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.mktemp('jax_cache'))
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'
  yield
  del (
    os.environ['JAX_COMPILATION_CACHE_DIR'],
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'],
  )


def run_main(args, *, code=None, env_extra=None, timeout=600):
  env = dict(os.environ, **(env_extra or {}))
  command = [sys.executable] + (['-c', code] if code else ['-m', 'cal_jax.main']) + args
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def final_state(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  return ocp.PyTreeCheckpointer().restore(path)


def flat(tree):
  import jax

  return {
    jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


@pytest.fixture(scope='module')
def shared_data(tmp_path_factory):
  """Synthetic data generated once, reused by every run through manual_dir/data_dir."""
  root = tmp_path_factory.mktemp('tiny_data')
  return [
    f'--config.data.manual_dir={root / "synthetic"}',
    f'--config.data.data_dir={root / "tfds"}',
  ]


TERMINAL = {}  # what the uninterrupted run printed: 'stdout', 'stderr'

# Library chatter that the default terminal leaves to WORKDIR/log.txt.
CHATTER = (
  'oneDNN',
  'absl::InitializeLog',
  'Downloading and preparing',
  'logging_writer.py',
  'reader.py',
  'dataset_builder.py',
  'Unable to initialize backend',
  'orbax',
)


@pytest.fixture(scope='module')
def uninterrupted_run(tmp_path_factory, shared_data):
  workdir = str(tmp_path_factory.mktemp('whole'))
  result = run_main(['--config', TINY, '--workdir', workdir] + COMMON + shared_data)
  assert result.returncode == 0, result.stderr[-3000:]
  TERMINAL.update(stdout=result.stdout, stderr=result.stderr)
  return workdir


@pytest.mark.slow
def test_default_terminal_shows_progress_and_leaves_chatter_to_the_log(uninterrupted_run):
  """The terminal: the data line, a line per log interval with the ETA, a line per
  checkpoint; the libraries' lines go to log.txt, with every terminal line too."""
  shown = TERMINAL['stderr']
  for word in CHATTER:
    assert word not in shown, (word, shown[-3000:])
  lines = shown.strip().splitlines()
  assert re.fullmatch(r'\d\d:\d\d:\d\d Data: sysu_mm01 \(synthetic\) from .*', lines[0]), lines
  progress = [line for line in lines if re.search(r' step \d+/8 \(\d+%\)  loss ', line)]
  assert [int(re.search(r'step (\d+)/', line)[1]) for line in progress] == [2, 4, 6, 8]
  assert all(re.search(r'\d+ images/s  ETA \d+(s|m\d\ds)$', line) for line in progress)
  assert sum('Checkpoint of step' in line for line in lines) == 2  # steps 4 and 8
  assert len(lines) <= 10, lines
  with open(os.path.join(uninterrupted_run, 'log.txt')) as f:
    log = f.read()
  assert 'logging_writer.py' in log and 'Downloading and preparing' in log
  for line in progress:
    assert line.split(' ', 1)[1] in log


@pytest.mark.slow
def test_verbose_shows_the_library_lines(tmp_path, shared_data, uninterrupted_run):
  workdir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted_run, workdir)
  result = run_main(
    ['--config', TINY, '--workdir', workdir, '--mode', 'eval', '--verbose'] + shared_data
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'evaluator.py' in result.stderr and 'embedded' in result.stderr


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, shared_data, uninterrupted_run):
  """8 steps uninterrupted == killed after the step-4 checkpoint, then resumed."""
  interrupted = str(tmp_path / 'interrupted')
  args = ['--config', TINY, '--workdir', interrupted] + COMMON + shared_data
  killed = run_main(args, code=KILLING_MAIN, env_extra={'KILL_AT': '4'})
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(interrupted, 'checkpoints'))) == ['4']

  resumed = run_main(args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from step 4' in resumed.stderr

  expected, got = flat(final_state(uninterrupted_run, 8)), flat(final_state(interrupted, 8))
  assert expected.keys() == got.keys()
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


# Run as `python -c`: cal_jax.main with each train step followed by STEP_SLEEP seconds, so
# that a signal sent once step 2 is logged arrives well before the last step.
SLOW_MAIN = textwrap.dedent("""
    import functools, os, sys, time
    from absl import app
    from cal_jax import main
    from cal_jax.config import cli
    from cal_jax.training import loop, step as step_lib
    def slow(config):
      step = step_lib.make_p_train_step(config)
      def slowed(*args):
        out = step(*args)
        time.sleep(float(os.environ['STEP_SLEEP']))
        return out
      return slowed
    loop.train_and_evaluate = functools.partial(loop.train_and_evaluate, make_step=slow)
    sys.argv[0] = 'cal_jax.main'
    app.run(main.main, flags_parser=cli.parse_flags)
""")


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resumes_to_the_uninterrupted_result(
  tmp_path, shared_data, uninterrupted_run
):
  """SIGTERM from outside, mid-run: the step in progress is finished and saved, one
  line says so, exit status 143; the same command then ends where an uninterrupted
  run does."""
  interrupted = str(tmp_path / 'interrupted')
  args = ['--config', TINY, '--workdir', interrupted] + COMMON + shared_data
  process = subprocess.Popen(
    [sys.executable, '-c', SLOW_MAIN] + args,
    cwd=REPO,
    text=True,
    env=dict(os.environ, STEP_SLEEP='1'),
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
  )
  lines = []
  try:
    for line in process.stderr:
      lines.append(line)
      if re.search(r' step 2/\d+ ', line):  # the progress line of step 2
        process.send_signal(signal.SIGTERM)
        break
    lines.extend(process.stderr)
    process.wait(timeout=300)
  finally:
    process.kill()
  stderr = ''.join(lines)
  assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  stopped = re.search(
    r'cal_jax.main: stopped by SIGTERM after step (\d+); its checkpoint is '
    rf'saved in {re.escape(interrupted)}/checkpoints\. Run the same command '
    r'again to resume\.$',
    stderr.strip(),
  )
  assert stopped, stderr[-3000:]
  step = int(stopped[1])
  assert 2 <= step < 8
  assert str(step) in os.listdir(os.path.join(interrupted, 'checkpoints'))

  resumed = run_main(args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from step {step}' in resumed.stderr
  expected, got = flat(final_state(uninterrupted_run, 8)), flat(final_state(interrupted, 8))
  assert expected.keys() == got.keys()
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_non_finite_loss_stops_naming_step_and_term(tmp_path, shared_data):
  """The loop checks every loss before it saves: the NaN step is reported, the last
  good checkpoint stays and no later one is written."""
  from cal_jax.training import divergence, loop
  from cal_jax.training.step import SCALARS
  from configs import tiny

  config = tiny.get_config()
  config.data.manual_dir, config.data.data_dir = (a.split('=', 1)[1] for a in shared_data)
  config.checkpoint_every_steps = 2
  config.eval.enabled = False

  def fake_p_train_step(config):
    del config
    calls = []

    def step(state, batch, key):
      del key
      calls.append(1)
      devices = batch['label'].shape[0]
      metrics = {term: np.ones(devices) for term in SCALARS}
      if len(calls) >= 3:
        metrics['pcl'] = np.full(devices, np.nan)
      metrics['assignment_counts'] = np.zeros((devices, 24), np.int32)
      metrics['bad_pairs'] = np.zeros(devices)
      return state, metrics

    return step

  with pytest.raises(divergence.NonFiniteLossError, match=r'step 4: pcl=nan'):
    loop.train_and_evaluate(config, str(tmp_path), make_step=fake_p_train_step)
  assert sorted(os.listdir(os.path.join(tmp_path, 'checkpoints'))) == ['2']


@pytest.mark.slow
def test_eval_mode_writes_results_for_every_protocol(tmp_path, shared_data, uninterrupted_run):
  """`--mode eval` on a finished run: eval_results.json with every SYSU key and field."""
  import json

  from cal_jax.evaluation.results import MODE_NAMES

  workdir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted_run, workdir)
  result = run_main(['--config', TINY, '--workdir', workdir, '--mode', 'eval'] + shared_data)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Evaluating the checkpoint of step 8.' in result.stderr
  assert 'embedded' not in result.stderr  # the evaluator's progress: in log.txt
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    written = json.load(f)
  keys = ['sysu/all/single', 'sysu/all/multi', 'sysu/indoor/single', 'sysu/indoor/multi']
  for key in keys:
    entry = written[key]
    for field in ('R1', 'R5', 'R10', 'R20', 'mAP', 'mINP'):
      assert 0.0 <= entry[field] <= 100.0, (key, field)
      assert entry[f'{field}_std'] >= 0.0
    assert entry['trials'] == 2
    mode = MODE_NAMES[key].split(' ', 1)[1]  # 'all-search single-shot'
    assert f'{mode}, 2 trials' in result.stdout  # the printed table
  assert written['meta']['checkpoint_step'] == 8


@pytest.mark.slow
def test_bfloat16_trains_and_evaluates_and_ranks_like_float32(tmp_path, shared_data):
  """config.model.dtype=bfloat16 end to end (train, checkpoint, evaluate), then the
  same checkpoint embedded in float32 and in bfloat16: the test set ranks alike.

  The bound is derived, not guessed. Rank-1 and AP are monotone in the scores: raising
  a positive's score or lowering a negative's never lowers them. With ds the change
  of each score from float32 to bfloat16, the bfloat16 result therefore lies between
  the metrics of the float32 scores with every positive lowered and every negative
  raised by its own |ds|, and with the opposite. The test computes that interval with
  the protocol's own metric and asserts the bfloat16 result inside it; the float32
  result is inside by construction, so the interval's width bounds the difference.
  """
  import json

  import jax
  import jax.numpy as jnp

  from cal_jax.evaluation import evaluator as evaluator_lib
  from cal_jax.evaluation import metrics
  from cal_jax.evaluation import run as run_lib
  from cal_jax.interop.export import load_workdir_config
  from cal_jax.training import restore

  workdir = str(tmp_path / 'bf16')
  result = run_main(
    ['--config', TINY, '--workdir', workdir, '--config.model.dtype=bfloat16']
    + ['--config.eval.pictures=False']
    + shared_data
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    written = json.load(f)
  assert written['meta']['checkpoint_step'] == 8
  assert all(np.isfinite(written['sysu/all/single'][m]) for m in ('R1', 'mAP', 'mINP'))
  losses = [float(v) for v in re.findall(r'loss (\S+)', result.stderr)]
  assert losses and all(np.isfinite(losses)), result.stderr[-2000:]

  config = load_workdir_config(workdir)
  assert config.model.dtype == 'bfloat16'
  trained = restore.restore_trained(config, workdir)
  # Parameters, batch-norm statistics and the optimizer's state stay float32.
  saved = jax.tree_util.tree_leaves((trained.state.params, trained.state.batch_stats))
  saved += [x for x in jax.tree_util.tree_leaves(trained.state.opt_state) if x.ndim]
  assert {x.dtype for x in saved} == {np.dtype(np.float32)}
  settings = evaluator_lib.EvalSettings.from_config(config)
  key = 'sysu/all/single'
  runs = {}
  for name, dtype in (('float32', None), ('bfloat16', jnp.bfloat16)):
    model = trained.model.clone(dtype=dtype)
    embedder = run_lib.make_embedder(model, trained.state, trained.counts.m_hat())
    runs[name] = evaluator_lib.evaluate(
      embedder, trained.splits.test, trained.splits.name, settings, keys=[key], log=lambda _: None
    )
  f32, b16 = runs['float32'], runs['bfloat16']
  assert np.array_equal(f32.row_of, b16.row_of)
  parts = config.model.num_parts
  # Each of the N_p parts is a unit vector: the per-part cosine of the two embeddings.
  cosine = np.sum((f32.features * b16.features).reshape(len(f32.features), parts, -1), axis=-1)
  # bfloat16 keeps 8 significant bits, so most parts agree to ~1e-3; the top-k of Eq. (3)
  # is discrete, though, and a near tie can select another token for a part: the
  # minimum over parts is not bounded, the mean is.
  assert cosine.mean() > 0.99, cosine.mean()
  labels = np.asarray(trained.splits.test.id)
  for t, split in enumerate(f32.splits[key]):
    scores = {
      name: r.features[r.row_of[split.query]] @ r.features[r.row_of[split.gallery]].T
      for name, r in runs.items()
    }
    delta = np.abs(scores['float32'] - scores['bfloat16'])
    positive = labels[split.query][:, None] == labels[split.gallery][None, :]
    shift = np.where(positive, delta, -delta)
    table = (labels, np.asarray(trained.splits.test.camera))
    bound = {}
    for name, sign in (('low', -1), ('high', 1)):
      ranked = metrics.evaluate_ranking(
        -(scores['float32'] + sign * shift),
        table[0][split.query],
        table[0][split.gallery],
        table[1][split.query],
        table[1][split.gallery],
        protocol=split.metric,
      )
      bound[name] = {'R1': 100.0 * ranked['cmc'][0], 'mAP': 100.0 * ranked['mAP']}
    got = {name: r.results[key]['per_trial'][t] for name, r in runs.items()}
    for metric in ('R1', 'mAP'):
      for name in runs:
        value = got[name][metric]
        assert bound['low'][metric] - 1e-6 <= value <= bound['high'][metric] + 1e-6, (
          t,
          name,
          metric,
          value,
          bound,
        )
    print(
      f'trial {t}: score difference median {np.median(delta):.4f} max {delta.max():.4f}; '
      f'R1 in [{bound["low"]["R1"]:.1f}, {bound["high"]["R1"]:.1f}], mAP in '
      f'[{bound["low"]["mAP"]:.1f}, {bound["high"]["mAP"]:.1f}]; '
      f'R1 {got["float32"]["R1"]:.1f} vs '
      f'{got["bfloat16"]["R1"]:.1f}, mAP {got["float32"]["mAP"]:.1f} vs '
      f'{got["bfloat16"]["mAP"]:.1f}'
    )
