"""The table of an ablation grid: per row, mean ± std over seeds, written as files.

  summarize(rows, results)   per row: R1, R10, mAP and mINP of the data set's first
                       protocol, mean and std over seeds, and the mean std over
                       gallery draws
  format_table(table, protocol)   Markdown, in the layout of the paper's Tables 3-5
  write_files(workdir, rows, results, about, out)   DIR/ablation.json, ablation.md and
                       the bar chart ablation.png; the table is also printed

`results` maps each row's name to its runs' eval_results.json, in seed order. The
grid run one run after another (`cal_jax.ablation_grid`) and the grid collected
after a cluster ran it (`cal_jax.ablation_grid.cluster`) write their table here.
"""

import json
import os

import numpy as np

from cal_jax.config import ablations

METRICS = ('R1', 'R10', 'mAP', 'mINP')


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
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

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


def write_files(
  workdir: str, rows: list[ablations.Row], results: dict[str, list[dict]], about: dict, out=print
) -> dict:
  """The table as DIR/ablation.json (`about`, e.g. the seeds and config, beside the rows),
  ablation.md and ablation.png, and printed. Returns the table."""
  table = summarize(rows, results)
  protocol = primary(results[rows[0].name][0])[0]
  text = format_table(table, protocol)
  with open(os.path.join(workdir, 'ablation.json'), 'w') as f:
    json.dump({'protocol': protocol, **about, 'rows': table}, f, indent=2)
  with open(os.path.join(workdir, 'ablation.md'), 'w') as f:
    f.write(text + '\n')
  plot(table, protocol, os.path.join(workdir, 'ablation.png'))
  out(text)
  return table
