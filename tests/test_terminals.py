"""Every command line's terminal holds only cal_jax's own lines; the libraries' go to a log.txt.

One check (`library_lines`) for all of them, over one list (`COMMANDS`) that must name every
module of cal_jax that runs as a command, so that a new command line cannot fall behind. The
tiny run is trained once, by `cal_jax.main` (the first command); the others read it. `ablate`
finds that run where its grid keeps row `full`, seed 0, and reads it back instead of training it
again (a row it trains writes all of that run's output into the row's own log.txt).
"""

import ast
import dataclasses
import glob
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from cal_jax.runtime import terminal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'cal_jax')

# absl's and the native (glog) prefix: 'I1206 12:00:00.123456 1234 checkpoint.py:459] ...'
ABSL = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d')
# TensorFlow's own prefix, and Python logging's default format ('WARNING:absl:...').
TF_LOG = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] ')
PY_LOG = re.compile(r'^(DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]+:')
# A Python warning, as `warnings` writes it: 'path.py:12: UserWarning: message'.
WARNING = re.compile(r'(\S+\.py):\d+: (\w+Warning): (.*)')
NOTICES = (
  'Traceback (most recent call last)',
  'absl::InitializeLog',
  'oneDNN',
  'TF_ENABLE_ONEDNN_OPTS',
  'This TensorFlow binary',
  'Unable to initialize backend',
  'libtpu',
  'cuda',
  'CUDA',
  '%|',  # a progress bar
)


def own_warnings() -> tuple[str, ...]:
  """The leading text of each `warnings.warn` message written in cal_jax's source."""
  texts = []
  for path in glob.glob(os.path.join(PACKAGE, '**', '*.py'), recursive=True):
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and ast.unparse(node.func) == 'warnings.warn' and node.args:
        message = node.args[0]
        first = message.values[0] if isinstance(message, ast.JoinedStr) else message
        if isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value:
          texts.append(first.value)
  return tuple(texts)


def library_lines(text: str) -> list[str]:
  """The lines of `text` that are not cal_jax's own. A warning is cal_jax's only when a
  file of cal_jax raises it with a message of its own: torch's warnings name the line of
  cal_jax that called torch, but their messages are torch's."""
  own = own_warnings()
  found = []
  for line in text.splitlines():
    warning = WARNING.search(line)
    if warning:
      path, _, message = warning.groups()
      if not (path.startswith(terminal.PACKAGE_DIR) and message.startswith(own)):
        found.append(line)
    elif ABSL.match(line) or TF_LOG.match(line) or PY_LOG.match(line):
      found.append(line)
    elif any(notice in line for notice in NOTICES):
      found.append(line)
  return found


def test_library_lines_are_found_and_cal_jax_lines_are_not():
  """The check itself, on the lines the issue saw and on lines the commands print."""
  export = os.path.join(terminal.PACKAGE_DIR, 'interop', 'export.py')
  evaluator = os.path.join(terminal.PACKAGE_DIR, 'evaluation', 'evaluator.py')
  library = [
    'I1206 12:00:00.123456 140 checkpoint.py:459] Closing _NonBlockingMetadataStore(...)',
    'W1206 12:00:00.1 140 checkpoint_manager.py:452] CheckpointManagerOptions.read_only=True',
    'I0000 00:00:1796606605.614054    6151 port.cc:153] oneDNN custom operations are on.',
    'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR',
    f'{export}:363: UserWarning: The given NumPy array is not writable, and PyTorch does not',
    f'01:23:45 WARNING: {export}:363: UserWarning: The given NumPy array is not writable',
    '/site-packages/orbax/checkpoint/x.py:10: DeprecationWarning: use y',
    '2026-12-06 12:00:00.123456: I tensorflow/core/platform/cpu_feature_guard.cc:210] ...',
    'WARNING:absl:a library line through the root logger',
    'Traceback (most recent call last):',
  ]
  own = [
    '01:21:50 Data: sysu_mm01 (synthetic) from /data: 279 training images of 16 identities.',
    '01:22:24 step 2/8 (25%)  loss 8.473  1 images/s  ETA 1m14s',
    f'01:22:43 WARNING: {evaluator}:463: UserWarning: gallery of 19 images is smaller than '
    'max_rank 20; the CMC curve is cut to 19 ranks',
    "wrote /out/cal.onnx: step 8, M-hat [1, 0, 3, 2], {'depth': 50, 'width': 8}",
    'cal_jax.convert: error: no checkpoints in /w (no /w/checkpoints): train first',
  ]
  assert library_lines('\n'.join(library + own)) == library


@dataclasses.dataclass(frozen=True)
class Command:
  module: str
  args: Callable[[str], list[str]]  # of the test's folder
  shows: tuple[str, ...]  # regular expressions its own lines match: it ran, and said so
  log: Callable[[str], str] | None  # where the libraries' lines go (None: nowhere new)
  suffix: str = ''  # the parameter's id: a command run more than once
  needs: tuple[str, ...] = ()  # optional packages

  @property
  def name(self) -> str:
    return self.module.split('.')[1] + (f'-{self.suffix}' if self.suffix else '')


def data_flags(root: str) -> list[str]:
  return [
    f'--config.data.manual_dir={os.path.join(root, "data", "synthetic")}',
    f'--config.data.data_dir={os.path.join(root, "data", "tfds")}',
    '--config.eval.pictures=False',
  ]


def grid(root: str) -> str:
  return os.path.join(root, 'grid')


def run_dir(root: str) -> str:
  return os.path.join(grid(root), 'full', 'seed_0')  # `ablate`'s row full, seed 0


def run_log(root: str) -> str:
  return os.path.join(run_dir(root), terminal.LOG_FILE)


def search_args(root: str) -> list[str]:
  data = os.path.join(root, 'data', 'synthetic')
  return [
    '--model', run_dir(root),
    '--query', os.path.join(data, 'cam3'), '--query_modality', 'infrared',
    '--gallery', os.path.join(data, 'cam1'), '--gallery_modality', 'visible',
    '--output', os.path.join(root, 'search'), '--top_k', '3',
  ]  # fmt: skip


TINY = os.path.join('configs', 'tiny.py')
MAIN = Command(
  'cal_jax.main',
  lambda root: ['--config', TINY, '--workdir', run_dir(root), '--config.seed=0', *data_flags(root)],
  (r'step 8/8 \(100%\)', r'\n +R1 +R10 '),
  run_log,
)
COMMANDS = [
  MAIN,
  Command(
    'cal_jax.visualize',
    lambda root: [
      *('--workdir', run_dir(root), '--output', os.path.join(root, 'pictures')),
      *'--what regions --num_ids 1'.split(),
    ],
    (r'pictures/regions\.png',),
    run_log,
  ),
  Command(
    'cal_jax.convert',
    lambda root: ['--workdir', run_dir(root), '--output', os.path.join(root, 'cal.safetensors')],
    (r'(?m)^wrote .*cal\.safetensors: step 8, M-hat',),
    run_log,
    suffix='safetensors',
  ),
  Command(
    'cal_jax.convert',
    lambda root: ['--workdir', run_dir(root), '--output', os.path.join(root, 'cal.onnx')],
    (r'(?m)^wrote .*cal\.onnx: step 8, M-hat',),
    run_log,
    suffix='onnx',
    needs=('torch', 'onnx'),
  ),
  Command(
    'cal_jax.search',
    search_args,
    (r'queries against \d+ gallery images',),
    lambda root: os.path.join(root, 'search', terminal.LOG_FILE),
  ),
  Command(
    'cal_jax.ablate',
    lambda root: [
      *('--config', TINY, '--workdir', grid(root), *data_flags(root)),
      *'--rows full --seeds 1'.split(),
    ],
    (r'1 runs \(1 rows x 1 seeds\), 1 already done', r'\| \+ MatchDistill \(CAL\) \| 1 \|'),
    None,
  ),
  Command(
    'cal_jax.pretrain',
    lambda root: [
      *('--output', os.path.join(root, 'pretrained', 'w.safetensors')),
      *'--config.model.width=4 --config.data.num_categories=3'.split(),
      *'--config.data.image_height=64 --config.data.image_width=32'.split(),
      *'--config.data.chains=16 --config.data.iterations=12 --config.optim.batch_size=4'.split(),
      *'--config.optim.num_steps=2 --config.optim.warmup_steps=1'.split(),
    ],
    (r'w\.safetensors: written \(\d+ tensors',),
    lambda root: os.path.join(root, 'pretrained', terminal.LOG_FILE),
  ),
]


def test_the_list_holds_every_command_line():
  """Each module of cal_jax that runs as a command (`if __name__ == '__main__'`)."""
  commands = set()
  for path in glob.glob(os.path.join(PACKAGE, '*.py')):
    with open(path, encoding='utf-8') as f:
      if "if __name__ == '__main__'" in f.read():
        commands.add('cal_jax.' + os.path.basename(path)[: -len('.py')])
  assert {'cal_jax.main', 'cal_jax.convert'} <= commands  # the glob found the package
  assert {command.module for command in COMMANDS} == commands


def execute(command: Command, root: str, *extra: str) -> tuple[subprocess.CompletedProcess, str]:
  """(the finished command, what it added to its log file)."""
  log = command.log(root) if command.log else None
  before = os.path.getsize(log) if log and os.path.exists(log) else 0
  # The commands set TF_CPP_MIN_LOG_LEVEL themselves; the test's own setting is not passed on.
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  done = subprocess.run(
    [sys.executable, '-m', command.module, *command.args(root), *extra],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  added = ''
  if log and os.path.exists(log):
    with open(log, encoding='utf-8', errors='replace') as f:
      f.seek(before)
      added = f.read()
  return done, added


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The test's folder, with the tiny run `cal_jax.main` trained there, and that run."""
  root = str(tmp_path_factory.mktemp('terminals'))
  return root, execute(MAIN, root)


def missing(command: Command) -> list[str]:
  return [name for name in command.needs if importlib.util.find_spec(name) is None]


@pytest.mark.slow
@pytest.mark.parametrize('command', COMMANDS, ids=[c.name for c in COMMANDS])
def test_the_terminal_holds_only_cal_jax_lines(command, trained):
  if missing(command):
    pytest.skip(f'needs {", ".join(missing(command))}')
  root, main_run = trained
  done, added = main_run if command is MAIN else execute(command, root)
  shown = done.stdout + done.stderr
  assert done.returncode == 0, shown[-3000:]
  for own in command.shows:
    assert re.search(own, shown), (own, shown[-3000:])
  assert library_lines(shown) == [], shown[-3000:]
  if command.log:  # the libraries' lines were moved, not lost
    assert library_lines(added), (command.log(root), added[-2000:])


@pytest.mark.slow
def test_verbose_convert_shows_the_libraries_and_no_torch_warning(trained):
  """--verbose shows the libraries' lines; torch's 'not writable' warning is not one of
  them (torch is handed writable arrays)."""
  onnx = COMMANDS[3]
  assert onnx.suffix == 'onnx'
  if missing(onnx):
    pytest.skip(f'needs {", ".join(missing(onnx))}')
  root, _ = trained
  done, _ = execute(onnx, root, '--overwrite', '--verbose')
  shown = done.stdout + done.stderr
  assert done.returncode == 0, shown[-3000:]
  assert any('checkpoint' in line for line in library_lines(shown)), shown[-3000:]
  assert 'not writable' not in shown, shown[-3000:]
