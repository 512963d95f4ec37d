"""A few-second configuration for tests: a narrow ResNet-50 on 64x32 images.

Not meant to learn anything; it exercises every part of CAL (both DRMs, the
TSAA, every loss term, the host matching) at a size that compiles and runs
quickly on a CPU. XLA on CPU is slow on tiny feature maps, so the network is
narrowed (width 8) rather than the images shrunk further.
"""

from cal_jax.config import formulations
from configs import default


def get_config():
  config = default.get_config()
  formulations.apply(config, 'measured')  # before this file's own changes
  config.data.synthetic = 'sysu'
  config.data.synthetic_num_ids = 24
  config.data.synthetic_height = 64
  config.data.image_height = 64
  config.data.image_width = 32
  config.data.num_ids_per_batch = 4
  config.data.num_pos = 2
  config.data.pad = 4
  config.model.depth = 50
  config.model.width = 8
  config.model.adapter_hidden = 32
  config.model.adapter_dim = 16
  config.model.channel_reduction = 8
  config.optim.num_epochs = 2
  config.optim.warmup_epochs = 1
  config.optim.steps_per_epoch = 4
  config.optim.backbone_lr_mult = 1.0
  config.data.eval_batch_size = 32
  config.eval.num_trials = 2
  config.log_every_steps = 2
  config.checkpoint_every_steps = 4
  return config
