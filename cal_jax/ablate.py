"""Command line: run rows of the paper's ablation tables over seeds, print the table.

  python -m cal_jax.ablate --config configs/synthetic.py --rows table3 --seeds 3 \
      --workdir runs/table3 [--config.FIELD=VALUE ...]

Each row and seed trains and evaluates in its own workdir, DIR/ROW/seed_S, with
`python -m cal_jax.main` (so a killed grid resumes where it stopped: finished
runs are read back, a half-trained one continues from its checkpoint). The
table gives, per row, R1, R10, mAP and mINP of the data set's first protocol
as mean ± std over seeds, and beside it the mean std over gallery draws. It is
printed, and written as DIR/ablation.json, DIR/ablation.md and a bar chart
DIR/ablation.png. Rows and tables: `cal_jax/config/ablations.py`.
"""

import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cal_jax.config import ablations, cli
from cal_jax.runtime import terminal
from cal_jax.runtime import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'The config every row starts from.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The grid: one workdir per row and seed below.')
_ROWS = flags.DEFINE_string(
  'rows',
  'table3',
  'Tables (table3, table4, table5, fig3_parts, '
  'fig3_alpha, diagnosis) and/or row names, comma-separated.',
)
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds 0..N-1 per row (config.seed).')
_FIRST_SEED = flags.DEFINE_integer('first_seed', 0, 'The first seed.')
flags.mark_flags_as_required(['config', 'workdir'])

METRICS = ('R1', 'R10', 'mAP', 'mINP')


def run_dir(workdir: str, row: ablations.Row, seed: int) -> str:
  return os.path.join(workdir, row.name, f'seed_{seed}')


def config_overrides(argv: list[str]) -> list[str]:
  """The --config.FIELD=VALUE flags of this command, passed on to every run."""
  return [a for a in argv if a.startswith('--config.')]


def run_one(
  config_file: str,
  directory: str,
  row: ablations.Row,
  seed: int,
  extra: list[str],
  config: Any = None,
) -> dict:
  """Trains and evaluates one row and seed (resuming), returns its eval_results.json.

  A finished run is read back only if it was trained with the config this row
  and seed now build from `config` (the grid's, with its --config flags): a run
  of an older default is refused, naming the fields, rather than reported as
  the new one. `python -m cal_jax.main` makes the same check on a half-trained run.
  """
  results_file = os.path.join(directory, 'eval_results.json')
  if os.path.exists(results_file):
    if config is not None:
      expected = ablations.apply(config, row, keep=tuple(cli.overridden_fields(['', *extra])))
      expected.seed = seed
      try:
        workdir_lib.check_config_unchanged(directory, expected)
      except workdir_lib.ConfigChangedError as error:
        raise workdir_lib.ConfigChangedError(
          f'row {row.name}, seed {seed}: {error} (a finished run of this grid; '
          'give the grid another --workdir to measure the row as it is now)'
        ) from None
    with open(results_file) as f:
      return json.load(f)
  os.makedirs(directory, exist_ok=True)
  command = [
    sys.executable,
    '-m',
    'cal_jax.main',
    '--config',
    config_file,
    '--workdir',
    directory,
    f'--config.seed={seed}',
    '--verbose',  # all of it once, into the log.txt below (main would write it a second time)
    *extra,
    *ablations.as_flags(row),
  ]
  with open(os.path.join(directory, 'log.txt'), 'a') as log:
    log.write('+ ' + ' '.join(command) + '\n')
    log.flush()
    done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
  if done.returncode != 0 or not os.path.exists(results_file):
    raise RuntimeError(
      f'row {row.name}, seed {seed} failed (exit {done.returncode}); '
      f'see {os.path.join(directory, "log.txt")}. Rerun to resume.'
    )
  with open(results_file) as f:
    return json.load(f)


def primary(results: dict) -> tuple[str, dict]:
  """The first protocol of a results file (as the best-checkpoint choice uses)."""
  key = next(k for k in results if k != 'meta')
  return key, results[key]


def summarize(rows: list[ablations.Row], results: dict[str, list[dict]]) -> dict:
  """Per row: mean and std over seeds of each metric, and the mean std over draws."""
  table = {}
  for row in rows:
    runs = [primary(r)[1] for r in results[row.name]]
    entry = {'label': row.label, 'overrides': row.overrides, 'seeds': len(runs)}
    for m in METRICS:
      values = np.array([r[m] for r in runs], float)
      entry[m] = float(values.mean())
      entry[f'{m}_std_seeds'] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
      entry[f'{m}_std_draws'] = float(np.mean([r.get(f'{m}_std', 0.0) for r in runs]))
      entry[f'{m}_per_seed'] = values.tolist()
    table[row.name] = entry
  return table


def format_table(table: dict, protocol: str) -> str:
  """Markdown, in the layout of the paper's Tables 3-5."""
  lines = [
    f'{protocol}: mean ± std over seeds [mean std over gallery draws]',
    '',
    '| row | seeds | ' + ' | '.join(METRICS) + ' |',
    '| --- | --- | ' + ' | '.join('---' for _ in METRICS) + ' |',
  ]
  for entry in table.values():
    cells = [
      f'{entry[m]:.2f} ± {entry[f"{m}_std_seeds"]:.2f} [{entry[f"{m}_std_draws"]:.2f}]'
      for m in METRICS
    ]
    lines.append(f'| {entry["label"]} | {entry["seeds"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(table: dict, protocol: str, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  labels = [e['label'] for e in table.values()]
  x = np.arange(len(labels))
  fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels)), 3.5))
  for i, metric in enumerate(('R1', 'mAP')):
    ax.bar(
      x + (i - 0.5) * 0.38,
      [e[metric] for e in table.values()],
      0.36,
      yerr=[e[f'{metric}_std_seeds'] for e in table.values()],
      capsize=3,
      label=metric,
    )
  ax.set_xticks(x, labels, rotation=20, ha='right', fontsize=8)
  ax.set_ylabel('%')
  ax.set_title(f'{protocol}, mean ± std over seeds', fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run_grid(
  config_file: str,
  workdir: str,
  rows: list[ablations.Row],
  seeds: list[int],
  extra: list[str],
  out=print,
  config: Any = None,
) -> dict:
  """Every row x seed (finished ones read back), then the table files. Returns the table.

  `config` (the grid's config, flags applied) lets a finished run be checked
  against what its row and seed build now; see `run_one`.
  """
  # Seed-major: a grid stopped early has every row at the first seeds.
  grid = [(row, seed) for seed in seeds for row in rows]
  results: dict[str, list[dict]] = {row.name: [] for row in rows}  # in seed order
  todo = [
    (r, s)
    for r, s in grid
    if not os.path.exists(os.path.join(run_dir(workdir, r, s), 'eval_results.json'))
  ]
  out(
    f'{len(grid)} runs ({len(rows)} rows x {len(seeds)} seeds), {len(grid) - len(todo)} '
    f'already done, in {workdir}'
  )
  started, trained = time.time(), 0
  for i, (row, seed) in enumerate(grid, 1):
    directory = run_dir(workdir, row, seed)
    fresh = (row, seed) in todo
    if fresh:
      out(f'[{i}/{len(grid)}] {row.name} seed {seed}: training ({directory}/log.txt)')
    result = run_one(config_file, directory, row, seed, extra, config)
    results[row.name].append(result)
    protocol, metrics = primary(result)
    eta = ''
    if fresh:
      trained += 1
      per_run = (time.time() - started) / trained
      eta = (
        f', {terminal.format_duration(time.time() - started)} so far, ETA '
        f'{terminal.format_duration(per_run * (len(todo) - trained))}'
      )
    out(
      f'[{i}/{len(grid)}] {row.name} seed {seed}: {protocol} R1 {metrics["R1"]:.2f} '
      f'mAP {metrics["mAP"]:.2f}{eta}'
    )
  table = summarize(rows, results)
  protocol = primary(results[rows[0].name][0])[0]
  text = format_table(table, protocol)
  with open(os.path.join(workdir, 'ablation.json'), 'w') as f:
    json.dump(
      {'protocol': protocol, 'seeds': seeds, 'config': config_file, 'extra': extra, 'rows': table},
      f,
      indent=2,
    )
  with open(os.path.join(workdir, 'ablation.md'), 'w') as f:
    f.write(text + '\n')
  plot(table, protocol, os.path.join(workdir, 'ablation.png'))
  out(text)
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    if _SEEDS.value < 1:
      raise ValueError(f'--seeds must be at least 1, got {_SEEDS.value}')
    rows = ablations.select_rows(_ROWS.value)
    for row in rows:  # every override names a real field, before anything runs
      ablations.apply(_CONFIG.value, row)
    workdir = cli.absolute_path(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    seeds = list(range(_FIRST_SEED.value, _FIRST_SEED.value + _SEEDS.value))
    run_grid(
      cli.absolute_path(flags.FLAGS['config'].config_filename),
      workdir,
      rows,
      seeds,
      config_overrides(sys.argv[1:]),
      out=lambda s: print(s, flush=True),
      config=_CONFIG.value,
    )
  except (ValueError, OSError, RuntimeError) as error:
    cli.exit_with('cal_jax.ablate', error)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
