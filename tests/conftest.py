"""Test-wide set-up: two fake CPU devices, so that every pmapped path is split."""

import os

# Must precede the first `import jax` anywhere in the test session. Two fake devices;
# and XLA's backend (LLVM) optimisation off: the tiny runs of the tests spend most of
# their time compiling, and level 0 compiles them in about two thirds of the time. It
# changes no HLO pass, so the computations, and what the tests compare, are the same.
# Subprocesses (the commands run end to end) inherit both through the environment.
for _flag in ('--xla_force_host_platform_device_count=2', '--xla_backend_optimization_level=0'):
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

NUM_CLASSES = 8


def make_identity_batch(config, devices: int, seed: int = 0) -> dict:
  """A batch laid out as the sampler lays it out: per device, whole identities,
  K visible then K infrared images each. Identities are learnable: a fixed
  random pattern per identity, rendered with a per-modality colour transform,
  plus noise."""
  rng = np.random.default_rng(seed)
  ids, k = config.data.num_ids_per_batch, config.data.num_pos
  h, w = config.data.image_height, config.data.image_width
  patterns = rng.normal(size=(NUM_CLASSES, h, w, 3)).astype(np.float32)
  to_infrared = rng.normal(size=(3, 3)).astype(np.float32)
  per_device = ids // devices
  images, labels, modality = [], [], []
  for d in range(devices):
    identities = np.arange(d * per_device, (d + 1) * per_device)
    lab = np.concatenate([np.repeat(identities, k)] * 2)
    mod = np.repeat([0, 1], per_device * k)
    img = patterns[lab] + 0.3 * rng.normal(size=(len(lab), h, w, 3)).astype(np.float32)
    img[mod == 1] = img[mod == 1] @ to_infrared
    images.append(img)
    labels.append(lab)
    modality.append(mod)
  return {
    'image': np.stack(images).astype(np.float32),
    'label': np.stack(labels).astype(np.int32),
    'modality': np.stack(modality).astype(np.int32),
  }


@pytest.fixture(scope='session')
def tiny_config():
  from configs import tiny

  config = tiny.get_config()
  # Constant learning rate, no weight decay: a parameter moves iff its gradient is non-zero.
  config.optim.weight_decay = 0.0
  config.optim.base_lr = config.optim.warmup_start_lr = config.optim.final_lr = 0.02
  return config


@pytest.fixture(scope='session')
def tiny_state(tiny_config):
  """An unreplicated initial train state of the tiny CAL (compiled once per session)."""
  import jax

  from cal_jax.training import state as train_state
  from cal_jax.training.state import build_model

  model = build_model(tiny_config, NUM_CLASSES, axis_name='batch')
  return train_state.create_train_state(model, tiny_config, jax.random.key(0), steps_per_epoch=4)


@pytest.fixture(scope='session')
def p_train_step(tiny_config):
  from cal_jax.training.step import make_p_train_step

  return make_p_train_step(tiny_config)


@pytest.fixture(scope='module')
def single_torch_thread():
  """torch's thread pool is 10-100x slower on tiny maps beside XLA's: one thread
  for the modules that compare against PyTorch (`pytestmark` in those files)."""
  import torch

  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """(config, workdir) of a tiny run as training leaves it, without compiling a train
  step: config.json, the initial state saved as the checkpoint of step 0, and the
  periodic evaluation of it (eval_results.json, TensorBoard metrics and pictures).
  Shared: copy the workdir before changing anything in it."""
  from clu import metric_writers

  from cal_jax.training import loop
  from cal_jax.training import state as train_state
  from cal_jax.training.assignments import AssignmentCounts
  from configs import tiny

  config = tiny.get_config()
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  setup = loop.TrainingSetup(config, workdir)
  state = train_state.initial_state(setup.model, config, setup.steps_per_epoch)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  counts = AssignmentCounts.zeros(config.model.num_parts)  # none counted: M-hat = identity
  with setup.checkpointer:
    setup.checkpointer.save(0, state, counts.to_json())
  writer = metric_writers.create_default_writer(workdir)
  setup.evaluator(state, counts, 0, writer=writer)
  writer.flush()
  return config, workdir


# The sequential grid that the ablation tests share: two rows, one seed, on the tiny config.
TINY_GRID_FLAGS = [
  *('--config', 'configs/tiny.py', '--rows', 'baseline,full', '--seeds', '1'),
  '--config.eval.pictures=False',
]


@pytest.fixture(scope='session')
def tiny_grid(tmp_path_factory):
  """(command, workdir, finished process) of `python -m cal_jax.ablate` run once on
  TINY_GRID_FLAGS from the repository root: each row trained one after another, then the
  table. Shared: rerun it (finished runs are only read back), but change nothing in it."""
  import subprocess
  import sys

  workdir = tmp_path_factory.mktemp('tiny_grid') / 'grid'
  command = [sys.executable, '-m', 'cal_jax.ablate', *TINY_GRID_FLAGS, '--workdir', str(workdir)]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
  return command, workdir, done
