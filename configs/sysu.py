"""SYSU-MM01 with the paper's recipe (Sec. 4.1): ResNet-50, 8 x (4 + 4), 100 epochs.

  python -m cal_jax.main --config configs/sysu.py --workdir DIR \
      --config.data.manual_dir=/path/to/SYSU-MM01 \
      --config.model.pretrained=/path/to/resnet50-0676ba61.pth

The paper's figures to reach: docs/results.md, "The paper's targets".
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'sysu_mm01'
  return config
