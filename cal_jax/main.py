"""Command line: train (then evaluate) or evaluate CAL.

  python -m cal_jax.main --config configs/synthetic.py --workdir DIR
  python -m cal_jax.main --config configs/sysu.py --workdir DIR \
      --config.data.manual_dir=/data/SYSU-MM01
  python -m cal_jax.main --mode eval --config configs/sysu.py --workdir DIR [--checkpoint STEP]

Multi-host: every process runs the same command. On a Cloud TPU VM and in a
SLURM step of several tasks the processes find each other by themselves;
elsewhere add --coordinator_address=HOST:PORT --num_processes=N --process_id=I
(`launch/` has the scripts).

Any config field can be overridden with --config.FIELD=VALUE; a misspelt field
or a value of the wrong type is refused before anything runs. Running the same
command on the same workdir resumes training from its latest checkpoint.
"""

import logging as logging_std
import os
import sys

# TensorFlow serves the input pipeline only: keep it off the accelerators.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from cal_jax.runtime import terminal  # noqa: E402  (absl only: before the libraries print)

# Before the flags are parsed: the libraries' native start-up notices come at import.
_VERBOSE_ARGS = ('--verbose', '--verbose=true', '--verbose=True', '--verbose=1')
if not any(
  a in _VERBOSE_ARGS or a.startswith(('-v=', '--v=', '--verbosity=')) or a in ('-v', '--v')
  for a in sys.argv[1:]
):
  terminal.quiet_start()

import jax  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cal_jax.config import cli  # noqa: E402
from cal_jax.runtime import distributed, stopping  # noqa: E402
from cal_jax.training import loop  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum(
  'mode', 'train', ['train', 'eval'], 'train: train then evaluate; eval: evaluate a checkpoint.'
)
_CHECKPOINT = flags.DEFINE_integer(
  'checkpoint', None, 'eval mode: the checkpoint step (default: the latest).'
)
_DISTRIBUTED = flags.DEFINE_enum(
  'distributed',
  'auto',
  list(distributed.MODES),
  'Start jax.distributed: auto (when --coordinator_address is given or a SLURM step of several '
  'tasks or a Cloud TPU VM is detected), always, never.',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'Multi-host: HOST:PORT of the coordinator (process 0).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process, 0..N-1.')
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
  'local_device_ids', None, "Multi-host: the devices this process drives (default: JAX's choice)."
)
flags.DEFINE_boolean(
  'verbose',
  False,
  'Show every library line on the terminal too (by default they go to WORKDIR/log.txt only; '
  "absl's -v N does the same).",
)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of Orbax and TensorStore (every save logs ~30 lines), and
  the tracebacks Orbax logs with its errors (a failed background save logs three):
  the error itself reaches the main thread, and is reported there (`--v=1` keeps them)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in ('/orbax/', '/tensorstore/'))
    if noisy and record.exc_info and not logging.level_debug():
      record.exc_info, record.exc_text = None, None
    if noisy and record.getMessage().startswith('Requested `tracked_metric`'):
      return False  # every save: the loop attaches the mAP after saving (record_metrics)
    return record.levelno >= logging_std.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    options = distributed.Options(
      mode=_DISTRIBUTED.value,
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      local_device_ids=tuple(int(i) for i in _LOCAL_DEVICE_IDS.value or ()) or None,
    )
  except ValueError as error:
    cli.exit_with('cal_jax.main', error)
  distributed.initialize(options)  # before anything touches a device
  tfds.disable_progress_bar()
  tf.config.experimental.set_visible_devices([], 'GPU')
  logging.info(
    'JAX process %d of %d, local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  config = cli.resolve_config_paths(_CONFIG.value)
  workdir = cli.absolute_path(_WORKDIR.value)
  try:
    if _MODE.value == 'train':
      loop.train_and_evaluate(config, workdir)
    else:
      loop.evaluate_checkpoint(config, workdir, _CHECKPOINT.value)
  except cli.USER_ERRORS as error:  # a message naming what to fix, not a traceback
    cli.exit_with('cal_jax.main', error)
  except stopping.Stopped as stopped:  # SIGTERM / SIGINT: the step is saved
    print(f'cal_jax.main: {stopped}', file=sys.stderr, flush=True)
    sys.exit(stopped.exit_status)
  except KeyboardInterrupt:  # a second SIGINT, or one before training started
    print(
      'cal_jax.main: interrupted (SIGINT); the workdir keeps its last committed '
      'checkpoint. Run the same command again to resume.',
      file=sys.stderr,
      flush=True,
    )
    sys.exit(130)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
