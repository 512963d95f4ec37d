"""The ablation grid on a cluster: its runs as commands for a scheduler, and the table
collected once they are done.

  python -m cal_jax.ablate ... --emit slurm      DIR/ablate_array.sbatch, a SLURM array
  python -m cal_jax.ablate ... --emit commands   one shell command per run, for any other
  python -m cal_jax.ablate ... --collect         the table, as the sequential grid writes it

Both emits write DIR/ablate_commands.txt: line k + 1 is run k of the grid (seed-major,
`cal_jax.ablation_grid`), `python -m cal_jax.main ARGS` shell-quoted, runnable as is from
the repository root (the paths in it are absolute; the interpreter is the one that wrote
it). ARGS are exactly those of the sequential grid's run but `--verbose`: that flag only
sends main's log lines to the terminal, so that the sequential grid can capture them into
DIR/ROW/seed_S/log.txt; without it main writes that log.txt itself (log.processN.txt on
the other processes of a multi-node run), and the scheduler's output keeps the terminal's
lines.

The array script runs task k as `bash launch/slurm.sbatch ARGS` (srun, `--distributed=always`,
the node's GPUs) from the repository root it was written from (CAL_JAX_REPO overrides it),
with the interpreter that wrote it (PYTHON overrides it). One node per task by default
(`--nodes=1`; the GPUs, CPUs and time of the other #SBATCH lines of `launch/slurm.sbatch`,
8 GPUs a node, read from it when the script is written): the grid's config then trains
as it does on one host, with the batch size and learning rate it gives (P must be a multiple
of the devices, and a second node would need P and the learning rate raised, README "Scaling
out"), and the grid's runs, not one run's steps, are what spreads over the cluster. Override
any of it on the command line: `sbatch --nodes=2 --gpus-per-node=4 DIR/ablate_array.sbatch`.
`bash DIR/ablate_array.sbatch --dry-run` with SLURM_ARRAY_TASK_ID=k prints task k's srun
command and runs nothing.

`--collect` trains nothing: it reads every run's eval_results.json, with the check of the
sequential grid that the run was trained with the config its row and seed build now, and
writes DIR/ablation.json, ablation.md and ablation.png. A run not finished is an error in one
line naming its row, seed and directory and the command that trains it, and nothing is
written: a table with a row over fewer seeds would read as the grid's.
"""

import os
import shlex
import sys

from cal_jax.ablation_grid import runs as ablation_grid
from cal_jax.ablation_grid import table as ablation_table
from cal_jax.config import ablations

COMMANDS_FILE = 'ablate_commands.txt'
ARRAY_SCRIPT = 'ablate_array.sbatch'
# What a #SBATCH line cannot hold in one value (or reads as a file-name pattern): such a
# workdir gets SLURM's default output file (slurm-JOB_TASK.out where sbatch was run).
_NOT_IN_A_DIRECTIVE = set(' \t\n%#\'"\\')


def command_line(grid: ablation_grid.Grid, row: ablations.Row, seed: int) -> str:
  return shlex.join(grid.command(row, seed))


def collect_command(grid: ablation_grid.Grid) -> str:
  return shlex.join(
    [
      sys.executable,
      '-m',
      'cal_jax.ablate',
      '--config',
      grid.config_file,
      '--workdir',
      grid.workdir,
      f'--rows={",".join(row.name for row in grid.rows)}',
      f'--first_seed={grid.seeds[0]}',
      f'--seeds={len(grid.seeds)}',
      *grid.extra,
      '--collect',
    ]
  )


def write_commands(grid: ablation_grid.Grid) -> tuple[str, list[str]]:
  """DIR/ablate_commands.txt, one line per run in grid order: (its path, the lines)."""
  lines = [command_line(grid, row, seed) for row, seed in grid.runs()]
  if any('\n' in line for line in lines):  # one run a line, and the script's comments
    raise ValueError('--emit: a path or --config value holds a newline; a command is one line')
  path = os.path.join(grid.workdir, COMMANDS_FILE)
  with open(path, 'w') as f:
    f.write(''.join(line + '\n' for line in lines))
  return path, lines


def _done(grid: ablation_grid.Grid) -> list[int]:
  """The indices of the runs that have their results already."""
  return [
    k
    for k, (row, seed) in enumerate(grid.runs())
    if os.path.exists(os.path.join(grid.run_dir(row, seed), ablation_grid.RESULTS_FILE))
  ]


def _listed(indices: list[int], first: int = 0) -> str:
  return ','.join(str(k + first) for k in indices)


def emit_commands(grid: ablation_grid.Grid, out=print, note=print) -> str:
  """The runs' command lines on `out` (one per line, nothing else) and in
  DIR/ablate_commands.txt; what to do with them on `note`. Returns the file's path."""
  path, lines = write_commands(grid)
  for line in lines:
    out(line)
  note(f'wrote {path}: {len(lines)} runs, one command a line, to run from the repository root')
  done = _done(grid)
  if done:
    which = _listed(done, 1)
    note(f'{len(done)} finished already (their lines would evaluate them again): lines {which}')
  note(f'afterwards, the table: {collect_command(grid)}')
  return path


def _one_node(launcher: str) -> list[str]:
  """The #SBATCH lines of launch/slurm.sbatch for one run of the grid: one node, the
  grid's job name; its own output file is left to the array's."""
  with open(launcher) as f:
    lines = [line.rstrip('\n') for line in f if line.startswith('#SBATCH --')]
  chosen = {'--job-name': 'cal_jax_ablate', '--nodes': '1'}
  one_node = []
  for line in lines:
    option = line.split()[1].split('=')[0]
    if option != '--output':
      one_node.append(f'#SBATCH {option}={chosen[option]}' if option in chosen else line)
  return one_node


def array_script(grid: ablation_grid.Grid, commands_file: str) -> str:
  """The SLURM array script of the grid: task k runs line k + 1 of `commands_file`."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  launcher = os.path.join(repo, 'launch', 'slurm.sbatch')
  if not os.path.isfile(launcher):
    raise ValueError(
      f'--emit slurm: no launch/slurm.sbatch in {repo}, where cal_jax is imported from; '
      'run it from a checkout of the repository'
    )
  script = os.path.join(grid.workdir, ARRAY_SCRIPT)
  output = os.path.join(grid.workdir, 'slurm-%A_%a.out')
  if _NOT_IN_A_DIRECTIVE & set(grid.workdir):
    output_line = '# --output: SLURM default (the workdir has a character #SBATCH cannot hold)'
  else:
    output_line = f'#SBATCH --output={output}'
  directives = '\n'.join(
    [f'#SBATCH --array=0-{len(grid.runs()) - 1}', *_one_node(launcher), output_line]
  )
  q = shlex.quote
  return f"""#!/usr/bin/env bash
{directives}
# The ablation grid of `python -m cal_jax.ablate --emit slurm` (cal_jax/ablation_grid/cluster.py):
# array task k trains run k of the grid, line k + 1 of {COMMANDS_FILE}, in its workdir
# DIR/ROW/seed_S (its log.txt there), through launch/slurm.sbatch on one node (override:
# sbatch --nodes=... --gpus-per-node=...). --dry-run prints task k's srun command.
#   submit:     sbatch {q(script)}
#   afterwards: {collect_command(grid)}
set -euo pipefail
commands_file={q(commands_file)}
repo=${{CAL_JAX_REPO:-{q(repo)}}}
task=${{SLURM_ARRAY_TASK_ID:?not an array task: submit it with sbatch, or set SLURM_ARRAY_TASK_ID}}
case $#:${{1:-}} in
  0: | 1:--dry-run) ;;
  *) echo "usage: sbatch [sbatch options] $0 | bash $0 --dry-run" >&2; exit 2 ;;
esac
line=$(sed -n "$((task + 1))p" "$commands_file")
if [[ -z $line ]]; then
  echo "ablate_array: no run $task in $commands_file (tasks 0-{len(grid.runs()) - 1})" >&2
  exit 2
fi
eval "run=($line)"  # PYTHON -m cal_jax.main ARGS, as shlex.quote wrote it
export PYTHON=${{PYTHON:-${{run[0]}}}}
echo "ablate_array: task $task: $line" >&2
cd "$repo"
exec bash launch/slurm.sbatch "$@" "${{run[@]:3}}"  # "$@": nothing, or --dry-run
"""


def emit_slurm(grid: ablation_grid.Grid, out=print) -> str:
  """DIR/ablate_array.sbatch and DIR/ablate_commands.txt; prints what to submit. Returns the
  script's path."""
  script = array_script(grid, os.path.join(grid.workdir, COMMANDS_FILE))  # first: it may refuse
  commands_file, lines = write_commands(grid)
  path = os.path.join(grid.workdir, ARRAY_SCRIPT)
  with open(path, 'w') as f:
    f.write(script)
  out(f'wrote {path}: a SLURM array of {len(lines)} tasks, one run each ({commands_file})')
  out(f'submit: sbatch {shlex.quote(path)}')
  done = _done(grid)
  if done:  # a finished run's task would only evaluate it again
    out(f'{len(done)} finished already: tasks {_listed(done)}')
    rest = [k for k in range(len(lines)) if k not in done]
    if rest:
      out(f'to train only the others: sbatch --array={_listed(rest)} {shlex.quote(path)}')
  out(f'afterwards, the table: {collect_command(grid)}')
  return path


def collect(grid: ablation_grid.Grid, out=print) -> dict:
  """The table of a grid a cluster trained: every run read back, then the table files.

  Raises:
    RuntimeError: a run has no results yet (nothing is written).
    ConfigChangedError: a run was trained with another config than its row builds now.
  """
  runs = grid.runs()
  found = {(row.name, seed): grid.finished(row, seed) for row, seed in runs}
  missing = [(row, seed) for row, seed in runs if found[row.name, seed] is None]
  if missing:
    row, seed = missing[0]
    others = f'; {len(missing) - 1} more of the {len(runs)} runs are not' if missing[1:] else ''
    raise RuntimeError(
      f'--collect: row {row.name}, seed {seed} is not finished (no {ablation_grid.RESULTS_FILE} '
      f'in {grid.run_dir(row, seed)}{others}); train it with: {command_line(grid, row, seed)}'
    )
  results = {row.name: [found[row.name, seed] for seed in grid.seeds] for row in grid.rows}
  out(f'{len(runs)} runs ({len(grid.rows)} rows x {len(grid.seeds)} seeds), in {grid.workdir}')
  return ablation_table.write_files(grid.workdir, grid.rows, results, grid.about(), out)
