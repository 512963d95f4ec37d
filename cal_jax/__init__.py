"""cal_jax: Concordant Attention Learning (Wu et al., ICCV 2023) for VI-ReID in JAX/Flax."""

__version__ = '0.1.0'
