"""The identity-loss baseline on the embedded default's data, for comparison with CAL.

  python -m cal_jax.main --config configs/synthetic_baseline.py --workdir workdir/baseline

Same data, network, schedule and steps as configs/synthetic.py; only the
global identity loss is on, and images are matched by the pooled feature
after its BNNeck (the AGW baseline, the paper's Table 3 "Baseline" row).
"""

from cal_jax.config import ablations
from configs import synthetic


def get_config():
  # The ablation command's "baseline" row: every CAL term 0, global ID loss 1.
  return ablations.apply(synthetic.get_config(), ablations.ROWS['baseline'])
