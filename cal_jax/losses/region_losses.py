"""The constraints on Discriminative Region Mining (Sec. 3.2.1).

  L_dis = - sum_k log Phi_k(P_k)_y                          (Eq. 4)
  L_div = sum_{i,j} triu(S_hat^T S_hat, 1)_{i,j}            (Eq. 5)

Both are computed per sample and averaged over the samples given.
"""

import jax
import jax.numpy as jnp
import optax


def discriminability_loss(part_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Eq. (4): part_logits [B, N_p, K], labels [B] -> mean over B of the sum over parts."""
  per_part = optax.softmax_cross_entropy_with_integer_labels(
      part_logits, jnp.broadcast_to(labels[:, None], part_logits.shape[:2]))
  return jnp.mean(jnp.sum(per_part, axis=1))


def diversity_loss(selected: jax.Array) -> jax.Array:
  """Eq. (5): selected S_hat [B, H*W, N_p] -> mean over B of the strict upper triangle sum."""
  gram = jnp.einsum('bnk,bnl->bkl', selected, selected)
  upper = jnp.triu(jnp.ones(gram.shape[1:], gram.dtype), k=1)
  return jnp.mean(jnp.sum(gram * upper, axis=(1, 2)))
