"""Pretraining the backbone without natural images (`python -m cal_jax.pretrain`)."""
