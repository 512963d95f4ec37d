"""Table 4's alternatives to DRM's part features as the TSAA queries P.

  LV  (`LearnableQueries`): N_p learned vectors, the same for every image of
      the modality: P = V, V in R^{N_p x C}.
  HS  (`HorizontalStripes`): the feature map cut into n horizontal stripes
      and each averaged, P_k = mean of the tokens of rows [floor(k h / n),
      ceil((k + 1) h / n)) (PyTorch's adaptive average pooling, so n need not
      divide h: stripes overlap by a row where it does not).

Both give the dict `RegionMining` gives, less the part classifiers of Eq. (4)
(there is no region to make discriminative, so L_dis and L_div do not
apply): 'parts' P [B, N_p, C], 'tokens' T [B, h*w, C], and as 'scores' and
'selected' [B, h*w, N_p] the weights P is aggregated with (HS: each stripe's
mask over its row count; LV: uniform), so that the pictures of Eq. (3)'s
S_hat have something true to draw.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

PART_QUERIES = ('drm', 'learnable', 'horizontal')  # DRM | Table 4 "LV" | "HS"


def stripe_weights(height: int, width: int, num_stripes: int) -> jax.Array:
  """[h*w, n] weights: stripe k averages rows floor(k h / n) .. ceil((k + 1) h / n) - 1."""
  rows = jnp.arange(height)
  starts = [math.floor(k * height / num_stripes) for k in range(num_stripes)]
  ends = [math.ceil((k + 1) * height / num_stripes) for k in range(num_stripes)]
  inside = jnp.stack([(rows >= s) & (rows < e) for s, e in zip(starts, ends)], axis=-1)
  per_token = jnp.repeat(inside, width, axis=0).astype(jnp.float32)  # row-major tokens
  return per_token / jnp.sum(per_token, axis=0, keepdims=True)


class HorizontalStripes(nn.Module):
  """Table 4 "HS": part k is the mean of the k-th horizontal stripe of the map."""

  num_parts: int = 4

  @nn.compact
  def __call__(self, feature_map: jax.Array) -> dict[str, jax.Array]:
    batch, height, width, channels = feature_map.shape
    tokens = feature_map.reshape(batch, height * width, channels)
    weights = stripe_weights(height, width, self.num_parts).astype(tokens.dtype)
    weights = jnp.broadcast_to(weights, (batch,) + weights.shape)
    parts = jnp.einsum('bnk,bnc->bkc', weights, tokens)
    return {'scores': weights, 'selected': weights, 'parts': parts, 'tokens': tokens}


class LearnableQueries(nn.Module):
  """Table 4 "LV": N_p learned query vectors, shared by every image."""

  num_parts: int = 4

  @nn.compact
  def __call__(self, feature_map: jax.Array) -> dict[str, jax.Array]:
    batch, height, width, channels = feature_map.shape
    tokens = feature_map.reshape(batch, height * width, channels)
    vectors = self.param(
      'vectors', nn.initializers.normal(stddev=1.0), (self.num_parts, channels), jnp.float32
    )
    parts = jnp.broadcast_to(vectors.astype(tokens.dtype), (batch,) + vectors.shape)
    uniform = jnp.full(
      (batch, height * width, self.num_parts), 1.0 / (height * width), tokens.dtype
    )
    return {'scores': uniform, 'selected': uniform, 'parts': parts, 'tokens': tokens}
