"""Target-aware Style-agnostic Attention Adapter (TSAA, Sec. 3.2.2).

  IN(P) = (P - mu(T_P)) / sigma(T_P),   IN(T) = (T - mu(T)) / sigma(T)     (7)
  A(T; P) = S(T, P) T  (x)  M(P; theta_3)                                  (8)
  S(T, P) = softmax(P_hat T_hat^T / sqrt(d))   (softmax over H*W)          (9)
  T_hat = M(IN(T); theta_1),   P_hat = M(IN(P); theta_2)                   (10)

mu and sigma are per-instance, per-channel statistics over the spatial tokens
(instance normalisation); a part query is normalised with the statistics of
the feature map it was aggregated from. (x) is channel-wise multiplication by
the query-guided channel attention, a sigmoid-gated MLP of the raw query.

The adapter is shared by both modalities. Its pieces are exposed separately so
that each image's T_hat and each query's P_hat are computed once and reused
by the self- and cross-refinements of Eqs. (11)-(12).

Table 4's TSAA ablations are attributes: `similarity='scaled_dot'` replaces
Eq. (9) by the scaled dot product of Eq. (6), softmax(P T^T / sqrt(C)) on the
raw queries and tokens (no IN, no MLPs: T_hat = T, P_hat = P), and
`channel_attention=False` drops M(P; theta_3) from Eq. (8) (gates of 1).

Not in the paper, a remedy under test: `similarity='cosine'` keeps Eqs. (7)
and (10) but compares the unit vectors of T_hat and P_hat, scaled by a learned
temperature s (initially `COSINE_SCALE`): S = softmax(s cos(P_hat, T_hat)).
A token whose T_hat is long then wins no query by its length alone (the
"sink" border token of docs/decisions/model_and_losses.md).

Also not in the paper: `border` > 0 leaves the tokens within `border` rows or
columns of the feature map's edge out of Eq. (9)'s softmax (S = 0 there; a
`token_mask` from `interior_tokens`). Those tokens' receptive fields reach the
zero padding of every convolution, which gives them a code of their position
that is the same in every image. Eq. (7)'s statistics still cover every token.

Also not in the paper: `centring=True` subtracts from IN(T), at each token
position, its mean over images before theta_1 (`PositionCentring`: the batch's
mean in training, a running average of it in evaluation, like batch norm's
mean). On small maps IN(T) at one position is mostly a code of that position,
the same in every image (docs/decisions/model_and_losses.md); centred, T_hat keeps only what
differs between images there, so no token is a key that every image shares.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cal_jax.models.normalize import l2_normalize

INSTANCE_NORM_EPSILON = 1e-5
SIMILARITIES = ('tsaa', 'scaled_dot', 'cosine')  # Eq. (9) | Eq. (6), Table 4 "SD" | cosine
COSINE_SCALE = 10.0  # initial temperature of the cosine similarity


def token_statistics(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """mu(T), sigma(T): per-instance, per-channel over tokens. [B, N, C] -> 2 x [B, 1, C]."""
  mean = jnp.mean(tokens, axis=1, keepdims=True)
  var = jnp.var(tokens, axis=1, keepdims=True)
  return mean, jnp.sqrt(var + INSTANCE_NORM_EPSILON)


def instance_normalize(x: jax.Array, source_tokens: jax.Array) -> jax.Array:
  """Eq. (7): normalise x [B, M, C] with the statistics of source_tokens [B, N, C]."""
  mean, std = token_statistics(source_tokens)
  return (x - mean) / std


def interior_tokens(height: int, width: int, border: int) -> jax.Array | None:
  """Which of the row-major h*w tokens lie `border` or more tokens inside the map's edge.

  Returns a bool [h*w] mask (None for border 0: every token). Raises ValueError
  when no token is left.
  """
  if border == 0:
    return None
  if border < 0 or 2 * border >= min(height, width):
    raise ValueError(
      f'config.model.attention_border={border} leaves no token of the {height}x{width} '
      f'feature map (it needs 2 x border < {min(height, width)}); use a smaller border'
    )
  rows = (jnp.arange(height) >= border) & (jnp.arange(height) < height - border)
  columns = (jnp.arange(width) >= border) & (jnp.arange(width) < width - border)
  return (rows[:, None] & columns[None, :]).reshape(-1)


class PositionCentring(nn.Module):
  """x [B, N, C] minus its mean over images at each position n (and channel c).

  Training: the batch's mean (synchronised over `axis_name`), and the running
  average m <- (1 - momentum) m + momentum mean; evaluation: m. Gradients flow
  through the batch mean, as through batch norm's.
  """

  momentum: float = 0.1
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    running = self.variable('batch_stats', 'mean', jnp.zeros, x.shape[1:], jnp.float32)
    if not train:
      return x - running.value.astype(x.dtype)
    mean = jnp.mean(x, axis=0)
    if self.axis_name is not None:
      mean = jax.lax.pmean(mean, self.axis_name)
    if not self.is_initializing():
      running.value = (1 - self.momentum) * running.value + self.momentum * jax.lax.stop_gradient(
        mean
      ).astype(jnp.float32)
    return x - mean


def spatial_similarity(
  queries_hat: jax.Array, tokens_hat: jax.Array, token_mask: jax.Array | None = None
) -> jax.Array:
  """Eq. (9): softmax over tokens of P_hat T_hat^T / sqrt(d). -> [B, N_p, H*W].

  token_mask: bool [H*W] or None; tokens where it is False get S = 0.
  """
  dim = queries_hat.shape[-1]
  logits = jnp.einsum('bkd,bnd->bkn', queries_hat, tokens_hat) / jnp.sqrt(float(dim))
  if token_mask is None:
    return jax.nn.softmax(logits, axis=-1)
  return jax.nn.softmax(logits, axis=-1, where=token_mask[None, None, :])


class MLP(nn.Module):
  """Dense -> ReLU -> Dense, applied to the last axis."""

  hidden: int
  out: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.out, name='fc2')(nn.relu(nn.Dense(self.hidden, name='fc1')(x)))


class AttentionAdapter(nn.Module):
  """TSAA parameters (theta_1, theta_2, theta_3) and its steps.

  Attributes:
    channels: C, the backbone's output channels.
    hidden: hidden width of the similarity MLPs theta_1 and theta_2.
    dim: d, their output width.
    channel_reduction: theta_3's hidden width is C // channel_reduction.
    similarity: 'tsaa' (Eqs. 7, 9, 10) or 'scaled_dot' (Eq. 6; Table 4 "SD").
    channel_attention: False drops M(P; theta_3) (Table 4 "w/o CA").
    centring: IN(T) centred per position over images before theta_1 (module doc).
    axis_name: the mapped axis over which `centring`'s batch mean is averaged.
  """

  channels: int
  hidden: int = 512
  dim: int = 256
  channel_reduction: int = 16
  similarity: str = 'tsaa'
  channel_attention: bool = True
  centring: bool = False
  axis_name: str | None = None

  def setup(self):
    if self.similarity not in SIMILARITIES:
      raise ValueError(
        f'config.model.attention_similarity must be one of {SIMILARITIES}, got {self.similarity!r}'
      )
    if self.similarity == 'cosine':
      self.cosine_scale = self.param(
        'cosine_scale', nn.initializers.constant(COSINE_SCALE), (), jnp.float32
      )
    if self.centring:
      self.position_centring = PositionCentring(axis_name=self.axis_name)
    self.token_mlp = MLP(self.hidden, self.dim)  # theta_1
    self.query_mlp = MLP(self.hidden, self.dim)  # theta_2
    self.channel_mlp = MLP(
      max(1, self.channels // self.channel_reduction), self.channels
    )  # theta_3

  def channel_gates(self, parts: jax.Array) -> jax.Array:
    """M(P; theta_3) of Eq. (8): [B, N_p, C] -> gates in (0, 1), [B, N_p, C] (1 w/o CA)."""
    if not self.channel_attention:
      return jnp.ones_like(parts)
    return jax.nn.sigmoid(self.channel_mlp(parts))

  def encode_tokens(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """T_hat = M(IN(T); theta_1): [B, H*W, C] -> [B, H*W, d] (T itself for Eq. 6).

    With `centring`, the batch's mean of IN(T) per position is subtracted in
    training (`train`), its running average in evaluation.
    """
    if self.similarity == 'scaled_dot':
      return tokens
    normalized = instance_normalize(tokens, tokens)
    if self.centring:
      normalized = self.position_centring(normalized, train)
    encoded = self.token_mlp(normalized)
    return l2_normalize(encoded) if self.similarity == 'cosine' else encoded

  def encode_queries(self, parts: jax.Array, source_tokens: jax.Array) -> jax.Array:
    """P_hat = M(IN(P); theta_2), IN with the statistics of T_P: -> [B, N_p, d] (P for Eq. 6)."""
    if self.similarity == 'scaled_dot':
      return parts
    encoded = self.query_mlp(instance_normalize(parts, source_tokens))
    if self.similarity != 'cosine':
      return encoded
    # Eq. (9) divides by sqrt(d): the scale s is applied as s * sqrt(d) here.
    scale = self.cosine_scale * jnp.sqrt(float(self.dim))
    return l2_normalize(encoded) * scale.astype(encoded.dtype)

  def __call__(
    self,
    tokens: jax.Array,
    parts: jax.Array,
    source_tokens: jax.Array,
    token_mask: jax.Array | None = None,
    train: bool = False,
  ) -> tuple[jax.Array, jax.Array]:
    """A(T; P) of Eq. (8) in one call.

    Args:
      tokens: T [B, H*W, C], the map being attended.
      parts: P [B, N_p, C], the part queries.
      source_tokens: T_P [B, H*W, C], the map P was aggregated from.
      token_mask: bool [H*W], the tokens S may attend (`interior_tokens`); None: all.
      train: batch statistics (and their update) for `centring`; else running ones.
    Returns:
      (refined features [B, N_p, C], similarity S [B, N_p, H*W]).
    """
    return refine(
      tokens,
      self.encode_tokens(tokens, train),
      self.encode_queries(parts, source_tokens),
      self.channel_gates(parts),
      token_mask,
    )


def refine(
  tokens: jax.Array,
  tokens_hat: jax.Array,
  queries_hat: jax.Array,
  channel_gates: jax.Array,
  token_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Eq. (8) from precomputed pieces: (S(T, P) T) (x) M(P; theta_3).

  Args:
    tokens: T [B, H*W, C].
    tokens_hat: T_hat [B, H*W, d].
    queries_hat: P_hat [B, N_p, d].
    channel_gates: M(P; theta_3) [B, N_p, C].
    token_mask: bool [H*W], the tokens S may attend; None: all.
  Returns:
    (refined features f [B, N_p, C], similarity S [B, N_p, H*W]).
  """
  similarity = spatial_similarity(queries_hat, tokens_hat, token_mask)
  attended = jnp.einsum('bkn,bnc->bkc', similarity, tokens)
  return attended * channel_gates, similarity


def attention_statistics(similarity: jax.Array) -> dict[str, jax.Array]:
  """How peaked and how diverse the maps S [B, N_p, H*W] are, as scalars.

  attention_max: mean over images and parts of max_n S (1: one-hot; 1/(H*W): uniform).
  attention_entropy: mean entropy of S, nats (0: one-hot; log(H*W): uniform).
  attention_distinct: mean over images of the number of distinct argmax tokens
    among the N_p parts (1: every part attends the same token).
  A collapse of the attention shows as max -> 1, entropy -> 0, distinct -> 1.
  """
  dtype = jnp.promote_types(similarity.dtype, jnp.float32)  # float64 stays float64
  similarity = similarity.astype(dtype)
  entropy = -jnp.sum(similarity * jnp.log(jnp.maximum(similarity, 1e-12)), axis=-1)
  peak = jnp.argmax(similarity, axis=-1)  # [B, N_p]
  earlier = jnp.tril(jnp.ones((peak.shape[1],) * 2, bool), k=-1)  # [k, j]: j < k
  repeated = jnp.any((peak[:, :, None] == peak[:, None, :]) & earlier[None], axis=-1)
  return {
    'attention_max': jnp.mean(jnp.max(similarity, axis=-1)),
    'attention_entropy': jnp.mean(entropy),
    'attention_distinct': jnp.mean(jnp.sum(~repeated, axis=-1).astype(dtype)),
  }
