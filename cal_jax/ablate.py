"""Command line: run rows of the paper's ablation tables over seeds, print the table.

  python -m cal_jax.ablate --config configs/synthetic.py --rows table3 --seeds 3 \
      --workdir runs/table3 [--config.FIELD=VALUE ...] [--emit slurm|commands | --collect]

Each row and seed trains and evaluates in its own workdir, DIR/ROW/seed_S, with
`python -m cal_jax.main` (so a killed grid resumes where it stopped: finished
runs are read back, a half-trained one continues from its checkpoint). The
table gives, per row, R1, R10, mAP and mINP of the data set's first protocol
as mean ± std over seeds, and beside it the mean std over gallery draws. It is
printed, and written as DIR/ablation.json, DIR/ablation.md and a bar chart
DIR/ablation.png. Rows and tables: `cal_jax/config/ablations.py`; the grid:
`cal_jax/ablation_grid/runs.py`; the table: `cal_jax/ablation_grid/table.py`.

On a cluster: `--emit slurm` writes a SLURM array script, one task per run, and
`--emit commands` one command line per run for any other scheduler; both train
nothing. Once they are done, `--collect` (with the same flags) writes the table
(`cal_jax/ablation_grid/cluster.py`).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from cal_jax.ablation_grid import cluster as ablate_cluster
from cal_jax.ablation_grid import runs as ablation_grid
from cal_jax.config import ablations, cli

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
_EMIT = flags.DEFINE_enum(
  'emit',
  None,
  ['slurm', 'commands'],
  'Train nothing; write the runs for a cluster: a SLURM array script (slurm), or one shell '
  'command per run (commands). --collect makes the table afterwards.',
)
_COLLECT = flags.DEFINE_boolean(
  'collect', False, 'Train nothing; make the table of a grid whose runs are all finished.'
)
flags.mark_flags_as_required(['config', 'workdir'])


def config_overrides(argv: list[str]) -> list[str]:
  """The --config.FIELD=VALUE flags of this command, passed on to every run."""
  return [a for a in argv if a.startswith('--config.')]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    if _SEEDS.value < 1:
      raise ValueError(f'--seeds must be at least 1, got {_SEEDS.value}')
    if _EMIT.value and _COLLECT.value:
      raise ValueError('--emit writes the runs, --collect reads them: give one of the two')
    rows = ablations.select_rows(_ROWS.value)
    for row in rows:  # every override names a real field, before anything runs
      ablations.apply(_CONFIG.value, row)
    grid = ablation_grid.Grid(
      config_file=cli.absolute_path(flags.FLAGS['config'].config_filename),
      workdir=cli.absolute_path(_WORKDIR.value),
      rows=rows,
      seeds=list(range(_FIRST_SEED.value, _FIRST_SEED.value + _SEEDS.value)),
      extra=config_overrides(sys.argv[1:]),
      config=_CONFIG.value,
    )
    out = lambda s: print(s, flush=True)
    if _COLLECT.value:
      ablate_cluster.collect(grid, out)
      return
    os.makedirs(grid.workdir, exist_ok=True)
    if _EMIT.value == 'slurm':
      ablate_cluster.emit_slurm(grid, out)
    elif _EMIT.value == 'commands':
      ablate_cluster.emit_commands(grid, out, note=lambda s: print(s, file=sys.stderr, flush=True))
    else:
      ablation_grid.train_all(grid, out)
  except (ValueError, OSError, RuntimeError) as error:
    cli.exit_with('cal_jax.ablate', error)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
