"""The ablation grid: its runs (row x seed), their workdirs and commands, trained one
after another.

A grid is rows of `cal_jax/config/ablations.py` times seeds. Each run trains and evaluates in
its own workdir, DIR/ROW/seed_S, with one `python -m cal_jax.main` command
(`Grid.arguments`), whoever runs it: `train_all` here, one run after another, or a
cluster (`cal_jax.ablation_grid.cluster`). The runs go seed-major (every row at seed 0, then
at seed 1, ...), so a grid stopped early has every row at the first seeds, and run k
is the same run for every path. A finished run is read back, not trained again, and
only if it was trained with the config its row and seed build now (`Grid.finished`).
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

from cal_jax.ablation_grid import table as ablation_table
from cal_jax.config import ablations, cli
from cal_jax.runtime import terminal
from cal_jax.runtime import workdir as workdir_lib

RESULTS_FILE = 'eval_results.json'


@dataclasses.dataclass
class Grid:
  config_file: str  # absolute, as every run is given it
  workdir: str  # absolute: DIR
  rows: list[ablations.Row]
  seeds: list[int]
  extra: list[str]  # the grid's --config.FIELD=VALUE flags, given to every run
  config: Any = None  # the grid's config, its flags applied; None: finished runs unchecked

  def runs(self) -> list[tuple[ablations.Row, int]]:
    """Every (row, seed), seed-major: run k of the grid."""
    return [(row, seed) for seed in self.seeds for row in self.rows]

  def run_dir(self, row: ablations.Row, seed: int) -> str:
    return os.path.join(self.workdir, row.name, f'seed_{seed}')

  def arguments(self, row: ablations.Row, seed: int) -> list[str]:
    """What `python -m cal_jax.main` is given to train and evaluate this run."""
    return [
      '--config',
      self.config_file,
      '--workdir',
      self.run_dir(row, seed),
      f'--config.seed={seed}',
      *self.extra,
      *ablations.as_flags(row),
    ]

  def command(self, row: ablations.Row, seed: int) -> list[str]:
    """The run's command line, with this interpreter."""
    return [sys.executable, '-m', 'cal_jax.main', *self.arguments(row, seed)]

  def about(self) -> dict:
    """What ablation.json says of the grid beside its rows."""
    return {'seeds': self.seeds, 'config': self.config_file, 'extra': self.extra}

  def finished(self, row: ablations.Row, seed: int) -> dict | None:
    """The run's eval_results.json, or None if it has none yet.

    Raises:
      ConfigChangedError: the run was trained with another config than the one this
        row and seed build now from `config` (an older default, other --config flags),
        naming the fields, rather than reported as the row it no longer is.
        `python -m cal_jax.main` makes the same check on a half-trained run.
    """
    directory = self.run_dir(row, seed)
    results_file = os.path.join(directory, RESULTS_FILE)
    if not os.path.exists(results_file):
      return None
    if self.config is not None:
      keep = tuple(cli.overridden_fields(['', *self.extra]))
      expected = ablations.apply(self.config, row, keep=keep)
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


def train(grid: Grid, row: ablations.Row, seed: int) -> dict:
  """Trains and evaluates one run (resuming) unless it is finished; its eval_results.json.

  `cal_jax.main` runs with `--verbose`, and all it prints goes into the run's log.txt
  (main itself would write its own lines there a second time).
  """
  results = grid.finished(row, seed)
  if results is not None:
    return results
  directory = grid.run_dir(row, seed)
  os.makedirs(directory, exist_ok=True)
  command = [*grid.command(row, seed), '--verbose']
  with open(os.path.join(directory, terminal.LOG_FILE), 'a') as log:
    log.write('+ ' + ' '.join(command) + '\n')
    log.flush()
    done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
  results = grid.finished(row, seed)
  if done.returncode != 0 or results is None:
    raise RuntimeError(
      f'row {row.name}, seed {seed} failed (exit {done.returncode}); '
      f'see {os.path.join(directory, terminal.LOG_FILE)}. Rerun to resume.'
    )
  return results


def train_all(grid: Grid, out=print) -> dict:
  """Every run of the grid (finished ones read back), then the table files. Returns the table."""
  runs = grid.runs()
  results: dict[str, list[dict]] = {row.name: [] for row in grid.rows}  # in seed order
  todo = [
    (r, s) for r, s in runs if not os.path.exists(os.path.join(grid.run_dir(r, s), RESULTS_FILE))
  ]
  out(
    f'{len(runs)} runs ({len(grid.rows)} rows x {len(grid.seeds)} seeds), '
    f'{len(runs) - len(todo)} already done, in {grid.workdir}'
  )
  started, trained = time.time(), 0
  for i, (row, seed) in enumerate(runs, 1):
    fresh = (row, seed) in todo
    if fresh:
      log = os.path.join(grid.run_dir(row, seed), terminal.LOG_FILE)
      out(f'[{i}/{len(runs)}] {row.name} seed {seed}: training ({log})')
    result = train(grid, row, seed)
    results[row.name].append(result)
    protocol, metrics = ablation_table.primary(result)
    eta = ''
    if fresh:
      trained += 1
      per_run = (time.time() - started) / trained
      eta = (
        f', {terminal.format_duration(time.time() - started)} so far, ETA '
        f'{terminal.format_duration(per_run * (len(todo) - trained))}'
      )
    out(
      f'[{i}/{len(runs)}] {row.name} seed {seed}: {protocol} R1 {metrics["R1"]:.2f} '
      f'mAP {metrics["mAP"]:.2f}{eta}'
    )
  return ablation_table.write_files(grid.workdir, grid.rows, results, grid.about(), out)
