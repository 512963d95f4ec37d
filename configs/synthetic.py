"""The embedded default: the full CAL objective on a generated SYSU-MM01-like set.

  python -m cal_jax.main --config configs/synthetic.py --workdir workdir/synthetic

Generates the synthetic data set (once, into WORKDIR/synthetic_data), trains
a narrow ResNet-50 from scratch on 96x48 images, then evaluates with the
SYSU-MM01 protocols and prints the table. Sized for a 2-core laptop CPU
(about 10 minutes); the README reports what it reaches.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.synthetic = "sysu"
  config.data.synthetic_num_ids = 96  # 64 training, 32 test identities
  config.data.image_height = 96
  config.data.image_width = 48
  config.data.pad = 4
  config.data.num_ids_per_batch = 8
  config.data.num_pos = 2
  config.model.width = 16  # a quarter of ResNet-50's width: fast on a CPU
  config.model.adapter_hidden = 128
  config.model.adapter_dim = 64
  config.optim.num_epochs = 10
  config.optim.warmup_epochs = 1
  config.optim.base_lr = 0.05  # from scratch, 0.1 diverges early (see README)
  config.optim.warmup_start_lr = 0.005
  config.optim.backbone_lr_mult = 1.0  # from scratch: no pretrained backbone
  config.eval.num_trials = 10
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  return config
