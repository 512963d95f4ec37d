"""RegDB, one trial per run (the standard practice: 10 trainings, mean over them).

  for t in 1 2 3 4 5 6 7 8 9 10; do
    python -m cal_jax.main --config configs/regdb.py --workdir DIR/trial_$t \
        --config.data.builder_config=trial_$t --config.data.manual_dir=/path/to/RegDB \
        --config.model.pretrained=/path/to/resnet50-0676ba61.pth
  done

The paper's figures to reach: docs/results.md, "The paper's targets".
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'regdb'
  config.data.builder_config = 'trial_1'
  config.eval.num_trials = 1  # one trial per trained model
  return config
