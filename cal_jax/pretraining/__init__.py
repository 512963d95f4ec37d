"""Pretraining the backbone without natural images (`python -m cal_jax.pretrain`).

- `fractals`: FractalDB-style categories (sigma-factor IFS) and their RGB images, by the chaos game.
- `training`: the supervised classification run on them.
- `weights_file`: the torchvision-format output, the hash of its inputs, the up-to-date check.
"""
