"""Multi-host data parallelism, on one machine: 2 processes x 2 CPU devices against 1 x 4.

The 2 x 2 run is started by `launch/local.sh` (loopback coordinator, gloo CPU collectives);
the 1 x 4 reference is a plain `python -m cal_jax.main` on four fake devices. Both train the
tiny config (ResNet-18 backbone) for 3 steps, each generating the same seeded synthetic data
into its workdir (in the 2 x 2 run process 0 first, process 1 after), and must end with the
same parameters. The 2 x 2 run evaluates at its end, each process embedding half of the test
images; `--mode eval` in one process on the same checkpoint must give the same metrics. Every
subprocess is bounded in time and runs in its own process group, killed if it overruns.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.slow  # every test here runs a command in a subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')
TIMEOUT_S = 420
NUM_CLASSES = 16  # training identities of the tiny synthetic set
NUM_STEPS = 3
# Small constant learning rate, no weight decay, and no MatchDistill terms: the Hungarian
# matching is an argmax over 24 permutations whose weights are nearly tied at initialisation,
# so a 1-ulp difference (float32 reductions run in another order across processes than inside
# one) can pick another matching and change an update by 1e-3..1e-2 of itself; the matching
# still runs, its terms just carry no gradient. Measured without them: 2e-5, but 6.7e-3 on
# another run of the same machine: DRM's top-k of Eq. 3 is discrete too, and a 1-ulp
# difference can select another token. One part that keeps every token (N_k = h*w) makes
# the selection a no-op; DRM, TSAA, PCL and the synchronised batch norm still all run.
OVERRIDES = {
  'optim.steps_per_epoch': 1,
  'optim.num_epochs': NUM_STEPS,
  'optim.warmup_epochs': 1,
  'optim.base_lr': 0.005,
  'optim.warmup_start_lr': 0.005,
  'optim.final_lr': 0.005,
  'optim.weight_decay': 0.0,
  'model.depth': 18,
  'checkpoint_every_steps': 100,
  'loss.kd1': 0.0,
  'loss.kd2': 0.0,
  'model.num_parts': 1,
  'model.select_ratio': 1.0,
  'eval.pictures': False,  # process 0 alone draws them (checked once: 6 s, no collective)
}
FAST_COMPILE = '--xla_backend_optimization_level=0'
# Relative difference of the 2 x 2 and 1 x 4 parameter updates (L2 over all parameters)
# below which the runs count as equal. Hosts reading the same identities, or gradients
# averaged within each process only, gave 1.7 and 1.6.
UPDATE_RTOL = 1e-3


def cli(overrides):
  return [f'--config.{key}={value}' for key, value in overrides.items()]


def tiny_config(overrides):
  from configs import tiny

  config = tiny.get_config()
  for key, value in overrides.items():
    *path, name = key.split('.')
    node = config
    for part in path:
      node = node[part]
    node[name] = value
  return config


def subprocess_env():
  """The test's environment for the runs: CPU, their own device counts, fast compilation.

  XLA's LLVM back end at -O0 compiles the tiny network's initialisation about 7x and its
  train step about 2.5x faster here; the few steps then run slower, which costs nothing.
  """
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  return dict(
    os.environ,
    PYTHON=sys.executable,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=' '.join(flags + [FAST_COMPILE] * (FAST_COMPILE not in flags)),
  )


def start(command, env):
  """A subprocess in its own session, so that its whole process group can be killed."""
  return subprocess.Popen(
    command,
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )


def finish(procs, timeout):
  """(returncode, output) of each; the process groups still running at the timeout are killed."""
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  return [(p.returncode, out) for p, out in zip(procs, outputs)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Trains 2 x 2 (evaluating at the end) and 1 x 4 (not evaluating) concurrently.

  Each run generates the synthetic data into its own workdir (seeded: the same images);
  in the 2 x 2 run process 0 generates, process 1 waits for it.
  """
  root = tmp_path_factory.mktemp('multihost')
  env = subprocess_env()
  two, one = str(root / 'two_by_two'), str(root / 'one_by_four')
  two_by_two = [
    os.path.join(REPO, 'launch', 'local.sh'),
    '-q',
    '-n',
    '2',
    '-d',
    '2',
    '-t',
    str(TIMEOUT_S),
    '-l',
    str(root / 'logs'),
    '--',
    '--verbose',  # the library lines this test reads, on the terminal (the per-process logs)
    '--config',
    TINY,
    '--workdir',
    two,
  ] + cli(OVERRIDES)
  one_by_four = [
    'env',
    f'XLA_FLAGS={env["XLA_FLAGS"]} --xla_force_host_platform_device_count=4',
    sys.executable,
    '-m',
    'cal_jax.main',
    '--verbose',
    '--config',
    TINY,
    '--workdir',
    one,
    '--config.eval.enabled=False',
  ] + cli(OVERRIDES)
  procs = [start(c, env) for c in (two_by_two, one_by_four)]
  start_params = initial_params()  # meanwhile
  (rc2, out2), (rc1, out1) = finish(procs, TIMEOUT_S + 30)
  logs = [open(root / 'logs' / f'process_{i}.log').read() for i in range(2)]
  assert rc2 == 0, out2[-3000:] + ''.join(log[-3000:] for log in logs)
  assert rc1 == 0, out1[-3000:]
  return {
    'two': two,
    'one': one,
    'logs': logs,
    'one_log': out1,
    'root': root,
    'start_params': start_params,
  }


def final_params(workdir):
  import jax

  tree = ocp.PyTreeCheckpointer().restore(
    os.path.join(workdir, 'checkpoints', str(NUM_STEPS), 'state')
  )
  return {
    jax.tree_util.keystr(k): np.asarray(v, np.float64)
    for k, v in jax.tree_util.tree_leaves_with_path(tree['params'])
  }


def initial_params():
  """The runs' initial parameters: `create_train_state` on the same config and seed (compiled
  at XLA's default level here: the same values up to rounding, far below an update)."""
  import jax

  from cal_jax.training import state as train_state
  from cal_jax.training.state import build_model

  config = tiny_config(OVERRIDES)
  state = train_state.create_train_state(
    build_model(config, NUM_CLASSES), config, jax.random.key(config.seed), steps_per_epoch=1
  )
  return {
    jax.tree_util.keystr(k): np.asarray(v, np.float64)
    for k, v in jax.tree_util.tree_leaves_with_path(state.params)
  }


def test_two_processes_end_with_the_parameters_of_one(runs):
  """Same global batches, gradients and batch statistics averaged over all 4 devices."""
  two, one, start = final_params(runs['two']), final_params(runs['one']), runs['start_params']
  assert two.keys() == one.keys() == start.keys()
  update = np.sqrt(sum(np.sum((one[k] - start[k]) ** 2) for k in one))
  difference = np.sqrt(sum(np.sum((two[k] - one[k]) ** 2) for k in one))
  assert update > 0.01  # the runs did train
  print(f'relative difference of the updates: {difference / update:.2e}')
  assert difference / update < UPDATE_RTOL, (difference, update)


def identities_per_device(log):
  match = re.search(r'Step 1: process \d+ of \d+, identities per local device: (\[.*\])\.', log)
  assert match, 'no per-process identity line in the log'
  return json.loads(match.group(1))


def test_each_process_feeds_its_own_identities(runs):
  first, second = (identities_per_device(log) for log in runs['logs'])
  assert not set(sum(first, [])) & set(sum(second, []))
  assert first + second == identities_per_device(runs['one_log'])


def test_only_process_zero_writes(runs):
  from cal_jax.evaluation import results as results_lib

  workdir = runs['two']
  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert len(events) == 1  # one TensorBoard writer
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    table = results_lib.format_table(json.load(f))
  assert table in runs['logs'][0]  # printed by process 0 only (process 1 logs it, indented)
  assert table not in runs['logs'][1]
  # Orbax's OCDBT store keeps one subtree per writing process: process 0's only.
  state = os.listdir(os.path.join(workdir, 'checkpoints', str(NUM_STEPS), 'state'))
  assert 'ocdbt.process_0' in state and 'ocdbt.process_1' not in state


def test_two_process_evaluation_equals_one_process(runs):
  """The test images split over 2 processes and gathered: each once, in order.

  The 2 x 2 run evaluated its final checkpoint at the end of training; `--mode eval` in one
  process on one device evaluates the same checkpoint again.
  """
  with open(os.path.join(runs['two'], 'eval_results.json')) as f:
    two = json.load(f)
  workdir = str(runs['root'] / 'evaluated_alone')
  shutil.copytree(runs['two'], workdir)
  os.remove(os.path.join(workdir, 'eval_results.json'))
  [(rc, out)] = finish(
    [
      start(
        [
          sys.executable,
          '-m',
          'cal_jax.main',
          '--verbose',
          '--mode',
          'eval',
          '--config',
          TINY,
          '--workdir',
          workdir,
        ]
        + cli(OVERRIDES),
        subprocess_env(),
      )
    ],
    TIMEOUT_S,
  )
  assert rc == 0, out[-3000:]
  assert 'JAX process 0 of 1' in out
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    one = json.load(f)
  assert one.keys() == two.keys()
  assert one['meta']['checkpoint_step'] == two['meta']['checkpoint_step'] == NUM_STEPS
  for key in one.keys() - {'meta'}:
    for name in ('R1', 'R5', 'R10', 'R20', 'mAP', 'mINP'):
      np.testing.assert_allclose(
        two[key][name], one[key][name], rtol=0, atol=1e-4, err_msg=f'{key} {name}'
      )
