"""The constraints on Discriminative Region Mining (Sec. 3.2.1).

  L_dis = - sum_k log Phi_k(P_k)_y                          (Eq. 4)
  L_div = sum_{i,j} triu(S_hat^T S_hat, 1)_{i,j}            (Eq. 5)

Both are computed per sample and averaged over the samples given.

Not in the paper, `attention_guidance_loss`: the TSAA map of each part query in
its own image's self-refinement, pulled towards the region DRM selected for it.
"""

import jax
import jax.numpy as jnp
import optax


def discriminability_loss(part_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Eq. (4): part_logits [B, N_p, K], labels [B] -> mean over B of the sum over parts."""
  per_part = optax.softmax_cross_entropy_with_integer_labels(
    part_logits, jnp.broadcast_to(labels[:, None], part_logits.shape[:2])
  )
  return jnp.mean(jnp.sum(per_part, axis=1))


def diversity_loss(selected: jax.Array) -> jax.Array:
  """Eq. (5): selected S_hat [B, H*W, N_p] -> mean over B of the strict upper triangle sum."""
  gram = jnp.einsum('bnk,bnl->bkl', selected, selected)
  upper = jnp.triu(jnp.ones(gram.shape[1:], gram.dtype), k=1)
  return jnp.mean(jnp.sum(gram * upper, axis=(1, 2)))


ATTENTION_DIV_FORMS = ('dot', 'cosine')


def attention_diversity_loss(similarity: jax.Array, form: str = 'cosine') -> jax.Array:
  """Not in the paper: Eq. (5) on the TSAA maps S [B, N_p, H*W] of one image's parts.

  dot:    sum_{k<l} <S_k, S_l>, Eq. (5)'s form; smallest for disjoint or uniform maps,
          so it also pushes every map towards uniform attention
  cosine: sum_{k<l} cos(S_k, S_l); uniform maps score the maximum, disjoint maps 0
  Mean over the batch.
  """
  if form == 'cosine':
    norms = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(similarity), axis=-1, keepdims=True), 1e-24))
    similarity = similarity / norms
  elif form != 'dot':
    raise ValueError(
      f'config.loss.attention_div_form must be one of '
      f'{", ".join(ATTENTION_DIV_FORMS)}, got {form!r}'
    )
  return diversity_loss(jnp.swapaxes(similarity, 1, 2))


def attention_guidance_loss(
  similarity: jax.Array, selected: jax.Array, attendable: jax.Array | None = None
) -> jax.Array:
  """Not in the paper: KL(q_k || S_k), q_k = S_hat_k / sum_n S_hat_k, mean over parts and B.

  similarity: S [B, N_p, H*W], the TSAA maps (Eq. 9) of an image's own part queries;
  selected: S_hat [B, H*W, N_p] (Eq. 3), the scores DRM kept for each part (0 elsewhere);
  attendable: bool [H*W], the tokens S may attend (`model.attention_border`), or
  None for all. q is renormalised over those tokens: S is 0 on the others, so the
  part of DRM's region there could not be matched. A part whose whole region lies
  there has no target and adds 0.
  q is a target: no gradient reaches DRM through it. The loss is 0 where each map
  equals its part's normalised selection, so its optimum is as spread as DRM's
  top-k region, not a one-hot map; where DRM's regions differ, so do the maps.
  """
  target = jax.lax.stop_gradient(jnp.swapaxes(selected, 1, 2))  # [B, N_p, H*W]
  if attendable is not None:
    target = jnp.where(attendable[None, None, :], target, 0.0)
  target = target / jnp.maximum(jnp.sum(target, axis=-1, keepdims=True), 1e-12)
  tiny = jnp.finfo(similarity.dtype).tiny
  log_ratio = jnp.log(jnp.maximum(target, tiny)) - jnp.log(jnp.maximum(similarity, tiny))
  return jnp.mean(jnp.sum(jnp.where(target > 0, target * log_ratio, 0.0), axis=-1))
