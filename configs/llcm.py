"""LLCM (DEEN, CVPR 2023) with the CAL recipe; DEEN trains LLCM at 384 x 144.

  python -m cal_jax.main --config configs/llcm.py --workdir DIR \
      --config.data.manual_dir=/path/to/LLCM \
      --config.model.pretrained=/path/to/resnet50-0676ba61.pth

The CAL paper reports no LLCM results.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'llcm'
  config.data.image_height = 384
  config.data.image_width = 144
  return config
