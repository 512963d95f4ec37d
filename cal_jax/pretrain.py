"""Command line: pretrain the backbone on fractal images and write torchvision weights.

  python -m cal_jax.pretrain --output weights.safetensors [--config.FIELD=VALUE ...]

The config is configs/pretrain.py (its docstring says what it trains) unless --config
names another file; any field can be overridden with --config.FIELD=VALUE. The output
is a torchvision-format state dict for `config.model.pretrained`; OUTPUT.json records
the inputs' hash and the curve, and OUTPUT.log the curve as it comes. When the output
exists and its inputs are those of this command, it says so and does nothing. Nothing
is downloaded. The terminal shows this command's own lines; the libraries' go to a
log.txt beside the output (--verbose shows them too), as the other command lines do.
"""

import os
import sys
import time

from cal_jax.runtime import terminal

if __name__ == '__main__':  # run as a command: an importer keeps its own terminal
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if '--verbose' not in sys.argv[1:]:
    terminal.quiet_start()  # before the libraries load (`cal_jax.runtime.terminal`)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cal_jax.config import cli  # noqa: E402
from cal_jax.pretraining import training, weights_file  # noqa: E402
from configs import pretrain as pretrain_config  # noqa: E402

try:
  _CONFIG = config_flags.DEFINE_config_file(
    'config', pretrain_config.__file__, 'Pretraining config file (default: configs/pretrain.py).'
  )
except (AttributeError, KeyError) as error:
  # With a default file, ml_collections applies the --config.FIELD overrides here, at
  # definition: a misspelt field is reported in one line, as cli.parse_flags reports it.
  cause = error.args[0] if isinstance(error, AttributeError) and error.args else error
  text = str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause).splitlines()
  sys.exit(
    f'FATAL Flags parsing error: no config field {text[0]} in configs/pretrain.py. '
    + ' '.join(text[1:])
  )
_OUTPUT = flags.DEFINE_string('output', None, 'The .safetensors file to write.')
_VERBOSE = flags.DEFINE_boolean(
  'verbose', False, "Show the libraries' lines too (else in a log.txt beside --output)."
)
flags.mark_flags_as_required(['output'])


def run(config, output: str) -> None:
  weights_file.check_output(output)
  digest = weights_file.inputs_hash(config)
  if weights_file.is_up_to_date(output, digest):
    print(f'{output}: up to date (inputs {digest[:12]}); nothing to do.')
    return
  settings = training.Settings.from_config(config)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  terminal.attach_log_file(os.path.dirname(os.path.abspath(output)))
  with open(output + '.log', 'w', encoding='utf-8') as log:

    def report(record: training.Record) -> None:
      line = (
        f'step {record.step:5d}  loss {record.loss:.4f}  accuracy {record.accuracy:.3f}  '
        f'lr {record.learning_rate:.4f}  {record.seconds:7.1f} s'
      )
      print(line, flush=True)
      log.write(line + '\n')
      log.flush()

    start = time.perf_counter()
    backbone, fc, curve = training.pretrain(settings, report)
    state = weights_file.state_dict(backbone, fc, settings.depth, settings.width)
    weights_file.write(output, state, config, curve, time.perf_counter() - start)
  print(f'{output}: written ({len(state)} tensors, {time.perf_counter() - start:.0f} s).')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    run(_CONFIG.value, cli.absolute_path(_OUTPUT.value))
  except cli.USER_ERRORS as error:
    cli.exit_with('pretrain', error)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
