"""Per-part L2 normalisation, shared by the network, the losses and the evaluator."""

import jax
import jax.numpy as jnp

L2_EPSILON = 1e-12  # floor of the squared norm: an all-zero vector stays zero


def l2_normalize(x: jax.Array, axis: int = -1, epsilon: float = L2_EPSILON) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), epsilon))
