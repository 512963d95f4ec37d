"""The grid of `python -m cal_jax.ablate`: the ablation rows (`cal_jax.config.ablations`) over
seeds, one `cal_jax.main` run each.

- `runs`: the (row, seed) runs, their workdirs and commands, the sequential run.
- `table`: mean ± std over seeds of each row, as JSON, Markdown and a chart.
- `cluster`: the grid handed to a scheduler (`--emit slurm`, `--emit commands`) and
  collected afterwards (`--collect`).
"""
