"""Command line: pictures of a trained run, as PNG files.

  python -m cal_jax.visualize --workdir DIR --what regions|attention|ranking|cmc \
      [--what ...] [--output DIR/pictures] [--checkpoint STEP] [--protocol KEY]

  regions    the regions DRM selects (S-hat, Eq. 3), per part, over a visible
             and an infrared test image of a few identities (the paper's Fig. 4)
  attention  the TSAA spatial attention (S, Eq. 9) of each part query, same images
  ranking    queries of a protocol and their top-10 gallery images, framed green
             (same identity) or red
  cmc        the CMC curves of DIR/eval_results.json, one per protocol and mode

The run's config is read from DIR/config.json (or give --config and
overrides, as to cal_jax.main); the checkpoint is restored as `--mode eval`
restores it, and M-hat is applied. `cmc` needs only eval_results.json.
"""

import dataclasses
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from cal_jax.runtime import terminal  # noqa: E402

if '--verbose' not in sys.argv[1:]:
  terminal.quiet_start()  # the libraries' lines to WORKDIR/log.txt, as cal_jax.main

import ml_collections  # noqa: E402
from absl import (  # noqa: E402
  app,
  flags,
  logging,  # noqa: E402
)
from ml_collections import config_flags  # noqa: E402

from cal_jax.config import checks as config_checks
from cal_jax.config import cli, run_config  # noqa: E402
from cal_jax.evaluation import evaluator, run  # noqa: E402
from cal_jax.evaluation import results as results_lib  # noqa: E402
from cal_jax.pictures import (
  figures,  # noqa: E402
  plots,  # noqa: E402
)
from cal_jax.runtime import workdir as workdir_lib  # noqa: E402
from cal_jax.training import restore  # noqa: E402

KINDS = ('regions', 'attention', 'ranking', 'cmc')

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Configuration file (default: the config.json the run wrote in --workdir).',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run to draw.')
_WHAT = flags.DEFINE_multi_enum('what', list(KINDS), KINDS, 'Pictures to draw (repeatable).')
_OUTPUT = flags.DEFINE_string(
  'output', None, 'Folder for the PNG files (default WORKDIR/pictures).'
)
_CHECKPOINT = flags.DEFINE_integer('checkpoint', None, 'Checkpoint step (default: the latest).')
_PROTOCOL = flags.DEFINE_string(
  'protocol', None, "ranking: protocol key, e.g. sysu/all/single (default: the data set's first)."
)
flags.DEFINE_boolean('verbose', False, "Show the libraries' lines too (else WORKDIR/log.txt).")
_TRIAL = flags.DEFINE_integer('trial', 0, 'ranking: the gallery draw.', lower_bound=0)
_NUM_IDS = flags.DEFINE_integer(
  'num_ids', 4, 'regions, attention: identities to draw.', lower_bound=1
)
_NUM_QUERIES = flags.DEFINE_integer('num_queries', 4, 'ranking: queries to draw.', lower_bound=1)
flags.mark_flags_as_required(['workdir'])


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote into its workdir."""
  return run_config.read_workdir_config(
    workdir, '--workdir must be a training run of cal_jax.main, or pass its --config'
  )


def draw(
  config: ml_collections.ConfigDict,
  workdir: str,
  what: list[str],
  output: str,
  *,
  checkpoint: int | None = None,
  protocol: str | None = None,
  trial: int = 0,
  num_ids: int = 4,
  num_queries: int = 4,
) -> list[str]:
  """Writes the PNGs of `what` into `output`; returns their paths."""
  for name, value, low in (
    ('num_ids', num_ids, 1),
    ('num_queries', num_queries, 1),
    ('trial', trial, 0),
  ):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f'--{name}={value}: must be an integer >= {low}')
  if 'ranking' in what:  # against what the data set has, before anything is read
    name = config_checks.dataset_name(config)
    keys = evaluator.protocol_keys(name)
    if protocol is not None and protocol not in keys:
      raise ValueError(f'--protocol={protocol!r} is not a protocol of {name}; choose one of {keys}')
    trials = 1 if name == 'regdb' else int(config.eval.num_trials)
    if trial >= trials:
      raise ValueError(
        f'--trial={trial}: {name} is evaluated on {trials} gallery draw(s) '
        f'(config.eval.num_trials); choose --trial from 0 to {trials - 1}'
      )
  workdir_lib.check_writable(output)  # before the work, not after
  drawn = {}
  if 'cmc' in what:
    path = os.path.join(workdir, 'eval_results.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f'{path} does not exist: evaluate first (python -m cal_jax.main --mode eval ...)'
      )
    results, meta = results_lib.read_results(path)
    drawn['cmc'] = plots.cmc_figure(
      figures.cmc_curves(results),
      f'CMC, {meta.get("dataset", "")} at step {meta.get("checkpoint_step", "?")}',
    )
  if set(what) - {'cmc'}:
    trained = restore.restore_trained(config, workdir, checkpoint)
    settings = evaluator.EvalSettings.from_config(config)
    embedder = run.make_embedder(
      trained.model, trained.state, trained.counts.m_hat(), settings.embedding
    )
    test, name = trained.splits.test, trained.splits.name
    if {'regions', 'attention'} & set(what):
      maps = figures.part_map_figures(embedder, test, settings.image_size, num_ids)
      drawn.update({k: v for k, v in maps.items() if k in what})
    if 'ranking' in what:
      keys = evaluator.protocol_keys(name)
      key = protocol or keys[0]
      if key not in keys:
        raise ValueError(f'--protocol={key!r} is not a protocol of {name}; choose one of {keys}')
      # The protocol's trials up to `trial`, evaluated as the results file was.
      evaluation = evaluator.evaluate(
        embedder,
        test,
        name,
        dataclasses.replace(settings, num_trials=trial + 1),
        keys=[key],
        log=logging.info,
      )
      ranked = figures.ranked_lists(evaluation, test, key, num_queries, trial=trial)
      drawn[f'ranking_{key.replace("/", "_")}'] = figures.ranking_figure(
        ranked, test, settings.image_size
      )
  paths = []
  for kind, fig in drawn.items():
    path = os.path.join(output, f'{kind}.png')
    with open(path, 'wb') as f:
      f.write(plots.to_png(fig))
    paths.append(path)
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  import tensorflow as tf

  tf.config.experimental.set_visible_devices([], 'GPU')  # TensorFlow serves the data only
  workdir = cli.absolute_path(_WORKDIR.value)
  try:
    config = _CONFIG.value if _CONFIG.value is not None else read_run_config(workdir)
    if os.access(workdir, os.W_OK):  # a run folder: its log.txt (appended to)
      terminal.attach_log_file(workdir)
    config = cli.resolve_config_paths(config)
    # The run's own config.json may lack fields newer versions write; `cmc` reads no data.
    what = list(dict.fromkeys(_WHAT.value))
    config_checks.check_config(config, partial=_CONFIG.value is None or what == ['cmc'])
    paths = draw(
      config,
      workdir,
      what,
      cli.absolute_path(_OUTPUT.value) or os.path.join(workdir, 'pictures'),
      checkpoint=_CHECKPOINT.value,
      protocol=_PROTOCOL.value,
      trial=_TRIAL.value,
      num_ids=_NUM_IDS.value,
      num_queries=_NUM_QUERIES.value,
    )
  except cli.USER_ERRORS as error:  # a message naming what to fix, not a traceback
    cli.exit_with('cal_jax.visualize', error)
  for path in paths:
    print(path)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
