"""Discriminative Region Mining (DRM, Sec. 3.2.1 of the CAL paper).

Part scoring: the feature map X is max-pooled at several scales (1x1 is the
identity, then 3x3 and 5x5; stride 1 and -inf padding keep the size, so the
"upsampling" of the paper is the identity), the results are concatenated along
channels, and a point-wise convolution (the N_p part *prototypes*) followed by
a softmax over the spatial positions gives the scores S [H*W, N_p].

Token selection and aggregation (Eq. 3): for each part the N_k tokens of
highest score are kept,

  S_hat = topk(S, N_k),  N_k = ceil(alpha * H * W / N_p),
  P = S_hat^T T / sum_j S_hat_j,

and each part feature P_k feeds its own classifier Phi_k for the
discriminability constraint (Eq. 4).
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def num_selected_tokens(num_tokens: int, num_parts: int, select_ratio: float) -> int:
  """N_k of Eq. (3): ceil(alpha * H*W / N_p), at least 1 and at most H*W."""
  n_k = math.ceil(select_ratio * num_tokens / num_parts - 1e-9)
  return max(1, min(num_tokens, n_k))


def multi_scale_max_pool(x: jax.Array, pool_sizes: Sequence[int]) -> jax.Array:
  """[B, H, W, C] -> [B, H, W, C * len(pool_sizes)], stride 1, size kept."""
  pooled = []
  for size in pool_sizes:
    if size == 1:
      pooled.append(x)
    else:
      pad = size // 2
      pooled.append(nn.max_pool(x, (size, size), strides=(1, 1), padding=((pad, pad), (pad, pad))))
  return jnp.concatenate(pooled, axis=-1)


def select_top_tokens(scores: jax.Array, num_selected: int) -> jax.Array:
  """T(S, N_k) of Eq. (3): keep each part's N_k highest scores, zero the rest.

  Args:
    scores: S, [B, H*W, N_p], softmax-normalised over H*W.
    num_selected: N_k.
  Returns:
    S_hat, [B, H*W, N_p]; gradients reach the kept scores only.
  """
  per_part = jnp.swapaxes(scores, 1, 2)  # [B, N_p, H*W]
  _, indices = jax.lax.top_k(jax.lax.stop_gradient(per_part), num_selected)
  mask = jnp.sum(jax.nn.one_hot(indices, per_part.shape[-1], dtype=scores.dtype), axis=-2)
  return scores * jnp.swapaxes(mask, 1, 2)


def aggregate_parts(selected: jax.Array, tokens: jax.Array) -> jax.Array:
  """P = S_hat^T T / sum_j S_hat_j (Eq. 3).

  Args:
    selected: S_hat, [B, H*W, N_p].
    tokens: T, [B, H*W, C].
  Returns:
    P, [B, N_p, C].
  """
  weighted = jnp.einsum('bnk,bnc->bkc', selected, tokens)
  return weighted / jnp.sum(selected, axis=1)[..., None]


class RegionMining(nn.Module):
  """DRM of one modality: part scoring, token selection, part classifiers.

  Attributes:
    num_parts: N_p.
    select_ratio: alpha of Eq. (3).
    num_classes: training identities, for the part classifiers Phi_k (Eq. 4).
    pool_sizes: max-pooling scales of the scorer.
  """

  num_parts: int = 4
  select_ratio: float = 0.6
  num_classes: int = 1
  pool_sizes: Sequence[int] = (1, 3, 5)

  @nn.compact
  def __call__(self, feature_map: jax.Array) -> dict[str, jax.Array]:
    """feature_map X [B, H, W, C] -> dict with

    'scores' S [B, H*W, N_p], 'selected' S_hat [B, H*W, N_p],
    'parts' P [B, N_p, C], 'part_logits' Phi_k(P_k) [B, N_p, num_classes].
    """
    batch, height, width, channels = feature_map.shape
    tokens = feature_map.reshape(batch, height * width, channels)
    pooled = multi_scale_max_pool(feature_map, self.pool_sizes)
    # The point-wise convolution whose N_p output channels are the part
    # prototypes that test-time matching reorders (Sec. 3.4).
    logits = nn.Dense(self.num_parts, name='prototypes')(pooled.reshape(batch, height * width, -1))
    scores = jax.nn.softmax(logits, axis=1)
    n_k = num_selected_tokens(height * width, self.num_parts, self.select_ratio)
    selected = select_top_tokens(scores, n_k)
    parts = aggregate_parts(selected, tokens)
    part_logits = nn.vmap(
      nn.Dense, in_axes=1, out_axes=1, variable_axes={'params': 0}, split_rngs={'params': True}
    )(self.num_classes, name='part_classifiers')(parts)
    return {
      'scores': scores,
      'selected': selected,
      'parts': parts,
      'part_logits': part_logits,
      'tokens': tokens,
    }
