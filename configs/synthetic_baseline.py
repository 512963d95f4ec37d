"""The identity-loss baseline on the embedded default's data, for comparison with CAL.

  python -m cal_jax.main --config configs/synthetic_baseline.py --workdir workdir/baseline

Same data, network, schedule and steps as configs/synthetic.py; only the
global identity loss is on, and images are matched by the pooled feature
after its BNNeck (the AGW baseline, the paper's Table 3 "Baseline" row).
"""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  for term in ("id", "pcl", "kd1", "kd2", "dis", "div"):
    config.loss[term] = 0.0
  config.loss.global_id = 1.0
  config.model.embedding = "global"
  return config
