"""Command line: export a trained CAL checkpoint for PyTorch (`cal_jax.interop.torch_model`).

  python -m cal_jax.convert --workdir DIR --output cal.safetensors [--checkpoint STEP]
  python -m cal_jax.convert --workdir DIR --output cal.pt --config configs/sysu.py
  python -m cal_jax.convert --workdir DIR --output cal.safetensors --overwrite
  python -m cal_jax.convert --workdir DIR --output cal.onnx [--modality both|visible|infrared]

An existing output file is replaced only with --overwrite. The config comes
from the workdir's `config.json`, or from --config (with --config.FIELD=VALUE
overrides, as `cal_jax.main`). What is written, and how: `cal_jax.interop.export`.

The terminal shows the `wrote ...` line and errors; the libraries' lines (Orbax
restoring the checkpoint, the native notices of TensorFlow and XLA) are
appended to the run's WORKDIR/log.txt, as `cal_jax.visualize` does, or to a
log.txt beside --output when the workdir cannot be written. --verbose shows
them on the terminal instead.
"""

import os
import sys

from cal_jax.runtime import terminal

if __name__ == '__main__':  # run as a command: an importer keeps its own terminal
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if '--verbose' not in sys.argv[1:]:
    terminal.quiet_start()  # before the libraries load (`cal_jax.runtime.terminal`)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cal_jax.config import cli  # noqa: E402
from cal_jax.interop import export  # noqa: E402


def log_folder(workdir: str, output: str) -> str | None:
  """Where log.txt goes: the workdir (the run's log), else the folder of `output` when
  the workdir cannot be written; None when the workdir is no folder (the export is
  refused) or neither can be written (the libraries' lines are then dropped)."""
  if not os.path.isdir(workdir):
    return None
  for folder in (workdir, os.path.dirname(output)):
    if os.path.isdir(folder) and os.access(folder, os.W_OK):
      return folder
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  flag = flags.FLAGS
  output = cli.absolute_path(flag.output)
  config = cli.resolve_config_paths(flag.config) if flag.config is not None else None
  workdir = cli.absolute_path(flag.workdir)
  try:
    metadata = export.export_checkpoint(
      workdir,
      output,
      step=flag.checkpoint,
      config=config,
      overwrite=flag.overwrite,
      modality=flag.modality,
    )
  except cli.USER_ERRORS as error:  # a message for the user, no traceback
    cli.exit_with('cal_jax.convert', error)  # a refused export leaves the workdir as it was
  # Only now, as the export is done: the libraries' lines held back so far go to log.txt.
  folder = log_folder(workdir, output)
  if folder is not None:
    terminal.attach_log_file(folder)
  print(
    f'wrote {output}: step {metadata["checkpoint_step"]}, '
    f'M-hat {metadata["m_hat"]}, {metadata["config"]}',
    flush=True,
  )


def define_flags() -> None:
  """The flags, defined when run as a command only: importing this module beside
  cal_jax.main (which defines --config and --workdir too) must not clash."""
  config_flags.DEFINE_config_file(
    'config', None, "Config file (default: the workdir's config.json).", lock_config=True
  )
  flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.DEFINE_string('output', None, 'The file to write: *.safetensors, *.pt or *.onnx.')
  flags.DEFINE_string(
    'modality', 'both', 'For *.onnx: the inputs of the graph (both, visible or infrared).'
  )
  flags.DEFINE_integer('checkpoint', None, 'The checkpoint step (default: the latest).')
  flags.DEFINE_boolean('overwrite', False, 'Replace --output if it exists.')
  flags.DEFINE_boolean(
    'verbose', False, "Show the libraries' lines too (else WORKDIR/log.txt, or beside --output)."
  )
  flags.mark_flags_as_required(['workdir', 'output'])


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
