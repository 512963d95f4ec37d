"""Pretraining the synthetic configs' backbone without natural images.

  python -m cal_jax.pretrain --output workdir/weights/fractal_w16.safetensors
  python -m cal_jax.main --config configs/synthetic.py --workdir workdir/pretrained \
      --config.model.pretrained=workdir/weights/fractal_w16.safetensors \
      --config.optim.backbone_lr_mult=0.1

Trains the narrow ResNet-50 of configs/synthetic.py (width 16, last stride 1, RGB
128x64 images) to classify fractal categories (cal_jax/pretraining/fractals.py:
FractalDB's iterated function systems, sampled by Anderson and Farrell's sigma-factor),
drawn afresh at every step, then writes a torchvision-format state dict that
`config.model.pretrained` loads as it loads ImageNet weights. Never the synthetic
people, nothing downloaded. Rerunning with the same config and an existing output
does nothing. See docs/decisions/pretraining.md for the
choice, the run's settings, its time and its curve.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0  # draws the categories, the initialisation and every batch

  config.model = ml_collections.ConfigDict()
  config.model.depth = 50
  config.model.width = 16  # configs/synthetic.py's model.width: the file fits only that width
  config.model.last_stride = 1  # as CAL: 8 x 4 maps at 128 x 64 (the weights do not depend on it)

  config.data = ml_collections.ConfigDict()
  config.data.num_categories = 64  # IFS systems, one class each
  config.data.min_maps = 2  # affine maps per system
  config.data.max_maps = 4
  config.data.image_height = 128  # the synthetic configs' image size
  config.data.image_width = 64
  config.data.chains = 256  # chaos-game points moved in parallel per image
  config.data.iterations = 48  # steps per point, 8 of them burn-in: 10,240 points an image

  config.optim = ml_collections.ConfigDict()
  config.optim.batch_size = 32
  config.optim.num_steps = 1600
  config.optim.warmup_steps = 200
  config.optim.base_lr = 0.03  # SGD with momentum, cosine decay to 0; 0.1 sent the loss to 7.4
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4

  config.log_every_steps = 20
  return config
