"""A synthetic benchmark with statistical power: 96 test identities, as SYSU-MM01.

  python -m cal_jax.main --config configs/synthetic_proxy.py --workdir workdir/proxy
  python -m cal_jax.ablate --config configs/synthetic_proxy.py --rows table3 --seeds 3 \
      --workdir workdir/proxy_table3

The embedded default (configs/synthetic.py) tests 32 identities, so one run's
Rank-1 moves by +-2-3.5 over gallery draws alone. This set tests SYSU-MM01's 96
identities and trains exactly as the embedded default does: the same 64
training identities' worth of data (160 generated, 96 of them test), the same
128x64 images, quarter-width ResNet-50, batch (P = 8, K = 2) and schedule (940
steps). The synthetic identities are drawn once (data.synthetic_seed = 0), so
that config.seed varies what seeds vary on a real benchmark: the
initialisation, the batches and the augmentation.

About 7 minutes a run alone on a 2-core CPU. What it reaches (CAL, TCA and the
identity-loss baseline over 5 seeds): docs/results.md, "The proxy setting".

Measured and not kept (docs/experiments.md, "L_kd1: the attention collapse and
the form of the feature-level loss", the proxy's second form): K = 4 as the
paper, on 96 training identities with P = 4 (1,072 steps, 10 minutes), left
every row under-trained (global ID loss 3.45 of ln 96 = 4.56 at the end); K = 4
with the paper's P = 8 costs twice the step.
"""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.data.synthetic_num_ids = 160
  config.data.synthetic_test_ids = 96  # as SYSU-MM01; the other 64 train, as the default
  config.data.synthetic_seed = 0  # one data set for every seed, as a real benchmark
  return config
