"""Command line: export a trained CAL checkpoint for PyTorch (`cal_jax.interop.torch_model`).

  python -m cal_jax.convert --workdir DIR --output cal.safetensors [--checkpoint STEP]
  python -m cal_jax.convert --workdir DIR --output cal.pt --config configs/sysu.py
  python -m cal_jax.convert --workdir DIR --output cal.safetensors --overwrite
  python -m cal_jax.convert --workdir DIR --output cal.onnx [--modality both|visible|infrared]

An existing output file is replaced only with --overwrite. The config comes
from the workdir's `config.json`, or from --config (with --config.FIELD=VALUE
overrides, as `cal_jax.main`). What is written, and how: `cal_jax.interop.export`.
"""

from absl import app, flags
from ml_collections import config_flags

from cal_jax import cli
from cal_jax.interop import export


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  flag = flags.FLAGS
  output = cli.absolute_path(flag.output)
  config = cli.resolve_config_paths(flag.config) if flag.config is not None else None
  try:
    metadata = export.export_checkpoint(
      cli.absolute_path(flag.workdir),
      output,
      step=flag.checkpoint,
      config=config,
      overwrite=flag.overwrite,
      modality=flag.modality,
    )
  except cli.USER_ERRORS as error:  # a message for the user, no traceback
    cli.exit_with('cal_jax.convert', error)
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
  flags.mark_flags_as_required(['workdir', 'output'])


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
