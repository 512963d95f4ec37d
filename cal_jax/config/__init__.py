"""What a run is asked to do, checked before anything runs.

- `cli`: the command lines' shared flag parsing (`--config` files, run configs, paths) and
  their one-line errors.
- `checks`: every config field's rule, and the checks across fields (`check_config`).
- `rules`: the kinds of rule (a type and a range, said in words).
- `run_config`: a run's config.json read back, completed from configs/default.py.
- `formulations`: the paper's objective and the measured variant, one field.
- `ablations`: the rows of the paper's ablation tables as named overrides.
"""
