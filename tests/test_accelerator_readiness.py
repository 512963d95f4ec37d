"""Ready for an accelerator machine without TensorFlow: the import hygiene of the model, the
losses, the train step, the embedding and the benchmark; the TensorFlow build the data layer
uses, kept off the GPUs; and `benchmarks/device_check.sh` on the CPU with TensorFlow blocked.

TensorFlow, TensorFlow Datasets and clu are blocked in a subprocess by packages of the same
names, first on PYTHONPATH, whose import raises ImportError.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu')


@pytest.fixture(scope='module')
def blocker(tmp_path_factory):
  """A folder of packages that shadow the blocked ones: importing any of them fails."""
  folder = tmp_path_factory.mktemp('blocked')
  for name in BLOCKED:
    (folder / name).mkdir()
    (folder / name / '__init__.py').write_text(f"raise ImportError('{name} is blocked')\n")
  return folder


def _python(code, *args, blocker=None, timeout=300):
  path = [str(blocker)] if blocker else []
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [ROOT]))
  return subprocess.run(
    [sys.executable, '-c', code, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_the_blocker_blocks_the_data_layer(blocker):
  """The block works: the data layer, which needs TensorFlow, does not import."""
  result = _python('import cal_jax.data.splits', blocker=blocker)
  assert result.returncode != 0
  assert 'tensorflow is blocked' in result.stderr


IMPORTS_WITHOUT_TENSORFLOW = """
import importlib.util, sys

import cal_jax.evaluation.embedding
import cal_jax.losses.objective
import cal_jax.models.cal
import cal_jax.training.step
from cal_jax.data.datasets import specs

assert specs.camera_classes('sysu_mm01'), 'the camera table is there'
spec = importlib.util.spec_from_file_location('bench', 'benchmarks/bench_train_step.py')
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
print('torch imported:', 'torch' in sys.modules)
print('blocked loaded:', sorted(m for m in sys.modules if m.split('.')[0] in {blocked}))
row = bench.Row.parse('cal:bf16')
print('rows:', row.id, bench.Row.parse('torch:f32').id, bench.Row.parse('embed:f32:default').id)
try:
  bench.Row.parse('cal:f16')
except ValueError:
  print('bad row refused')
bench.flags.FLAGS(['bench'])
h100, pcie = '1 x NVIDIA H100 80GB HBM3 (gpu)', '1 x NVIDIA H100 PCIe (gpu)'
print('peaks:', [bench.peak_tflops(a, h100) for a in ('fp32', 'tf32', 'bf16')],
      bench.peak_tflops('tf32', pcie), bench.peak_tflops('fp32', '4 x TPU v4 (tpu)'))
"""


def test_model_step_embedding_and_benchmark_import_without_tensorflow(blocker):
  result = _python(IMPORTS_WITHOUT_TENSORFLOW.format(blocked=set(BLOCKED)), blocker=blocker)
  assert result.returncode == 0, result.stderr
  assert 'blocked loaded: []' in result.stdout
  # JAX's backend must start before torch is imported: importing the benchmark imports no torch.
  assert 'torch imported: False' in result.stdout
  assert 'rows: cal:bf16 torch:f32:highest embed:f32:default' in result.stdout
  assert 'bad row refused' in result.stdout
  # MFU against the peak of the arithmetic that ran: TF32 is not counted against fp32's peak.
  assert 'peaks: [67.0, 494.7, 989.4] 378.0 None' in result.stdout


def test_the_builders_register_on_first_use():
  """The datasets package imports no TensorFlow; its builder modules still load (and
  register their tfds builders) when named."""
  code = (
    'import sys\n'
    'import cal_jax.data.datasets as datasets\n'
    "print('tf at import:', 'tensorflow' in sys.modules)\n"
    'module = datasets.sysu_mm01\n'
    'import tensorflow_datasets as tfds\n'
    "print('registered:', 'sysu_mm01' in tfds.list_builders(with_community_datasets=False))\n"
  )
  result = _python(code)
  assert result.returncode == 0, result.stderr
  assert 'tf at import: False' in result.stdout
  assert 'registered: True' in result.stdout


def test_tensorflow_is_the_cpu_build_and_sees_no_gpu():
  """The dependency is tensorflow-cpu, which has no CUDA kernels: it cannot take GPU memory."""
  assert importlib.metadata.version('tensorflow-cpu')
  tf = pytest.importorskip('tensorflow')
  assert not tf.test.is_built_with_cuda()
  assert tf.config.list_physical_devices('GPU') == []


HIDES_GPUS = """
import json, sys

import tensorflow as tf

calls = []
real = tf.config.experimental.set_visible_devices


def recording(devices, device_type=None):
  calls.append(['hide', list(devices), device_type])
  return real(devices, device_type)  # raises RuntimeError once TensorFlow used its devices


tf.config.experimental.set_visible_devices = recording
from absl import app

from cal_jax import main


def train(config, workdir):
  calls.append(['train', len(tf.config.get_visible_devices('GPU'))])


main.loop.train_and_evaluate = train
try:
  app.run(main.main, argv=['main', '--config', 'configs/tiny.py', '--workdir', sys.argv[1]])
except SystemExit:
  pass
with open(sys.argv[2], 'w') as f:
  json.dump(calls, f)
"""


def test_the_command_hides_gpus_from_tensorflow_before_training(tmp_path):
  """`cal_jax.main` makes no GPU visible to TensorFlow, before TensorFlow has started (the
  real `set_visible_devices` refuses afterwards), and before the training starts."""
  calls = tmp_path / 'calls.json'
  result = _python(HIDES_GPUS, str(tmp_path / 'workdir'), str(calls))
  assert result.returncode == 0, result.stderr
  assert json.loads(calls.read_text()) == [['hide', [], 'GPU'], ['train', 0]]


def _table_row(report, note):
  """The cells of the table row whose note starts with `note`."""
  for line in report.splitlines():
    if re.search(rf'  {re.escape(note)}(,|$)', line):
      return line.split()
  raise AssertionError(f'no row {note} in\n{report}')


@pytest.mark.slow
def test_device_check_runs_on_the_cpu_without_tensorflow(blocker, tmp_path):
  """The prepared accelerator check, in its smoke mode (the tiny config, three rows, each in
  its own process): versions, devices and the table with the host round trip and the
  embedding, in one file."""
  report_path = tmp_path / 'report.txt'
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(blocker))
  result = subprocess.run(
    ['bash', os.path.join(ROOT, 'benchmarks', 'device_check.sh'), '--smoke', '--out', report_path],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = report_path.read_text()
  assert 'tensorflow: not importable' in report
  assert re.search(r'jax backend cpu, \d+ device\(s\)', report)
  cal = _table_row(report, 'cal:f32:highest')
  identity = _table_row(report, 'cal_identity:f32:highest')
  embed = _table_row(report, 'embed:bf16')
  assert cal[:4] == ['jax', 'CAL', 'f32', 'fp32']
  assert re.fullmatch(r'[\d.e+-]+%', cal[7]), 'the host solver share of the CQM step'
  assert identity[:5] == ['jax', 'CAL', 'identity', 'f32', 'fp32']
  assert not identity[8].endswith('%'), 'the identity assignment calls no host function'
  assert float(embed[6]) > 0  # images/s
  assert re.search(
    r'host round trip f32 \(fp32\): CAL with CQM \(jax\.pure_callback\) - CAL with the '
    r'identity assignment = -?[\d.]+ ms/step',
    report,
  )
  assert re.search(r'embedding bf16 \(bf16\): [\d.]+ images/s at 64x32', report)
