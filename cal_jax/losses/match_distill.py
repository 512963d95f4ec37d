"""MatchDistill (Sec. 3.3): cross-modal query matching and dual-level distillation.

For a sample i with partner j of the other modality (same identity), in the
visible direction (the infrared queries of i against the visible queries of j,
both attending the visible map of j):

  w(E^V_{k1,k2}) = < S(X^V_j, P^I_{i,k1}), S(X^V_j, P^V_{j,k2}) >              (16)
  M = argmax over perfect matchings of sum_{e in M} w(e)                        (17)
  L_kd1 = - sum_{e in M} w(e)                                                   (18)
  L_kd2 = sum_{(u,v) in M} KL(p^{V,I}_u || p^{V,V}_v)                           (19)

and symmetrically in the infrared direction. Eq. (17) is solved on the host
with scipy's Hungarian solver, once per step for the whole batch, through
`jax.pure_callback`; no gradient flows through the assignment. In Eqs. (18)
and (19) the cross-refined attention map and distribution are the teachers
(their gradients are stopped) and the self-refined ones, the inference path,
the students.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment


def edge_weights(cross_similarity: jax.Array, partner_self_similarity: jax.Array) -> jax.Array:
  """Eq. (16). [B, N_p, H*W] x [B, N_p, H*W] -> W [B, N_p (k1), N_p (k2)]."""
  return jnp.einsum('bkn,bln->bkl', cross_similarity, partner_self_similarity)


def distillation_edge_weights(cross_similarity: jax.Array,
                              partner_self_similarity: jax.Array) -> jax.Array:
  """Eq. (16) as L_kd1 optimises it: the cross-refined map is the teacher.

  Same values as `edge_weights`; the gradient reaches only the self-refined
  (student, inference-path) maps, as the teacher of L_kd2 is stopped too.
  Letting it reach both let the two maps agree on a trivial target: from
  scratch the part identity loss then stayed at chance (see
  docs/decisions.md, "Directions and normalisation of MatchDistill").
  """
  return edge_weights(jax.lax.stop_gradient(cross_similarity), partner_self_similarity)


def solve_assignments_on_host(weights: np.ndarray) -> np.ndarray:
  """Eq. (17) for a batch: [B, N_p, N_p] -> perm [B, N_p] with perm[b, k1] = k2.

  Maximises sum_k1 weights[b, k1, perm[b, k1]] with the Kuhn-Munkres algorithm.
  """
  weights = np.asarray(weights, dtype=np.float64)
  perms = np.empty(weights.shape[:2], dtype=np.int32)
  for b, w in enumerate(weights):
    if not np.all(np.isfinite(w)):  # let the loss report the non-finite value
      perms[b] = np.arange(w.shape[0])
      continue
    rows, cols = linear_sum_assignment(w, maximize=True)
    perms[b, rows] = cols
  return perms


def match_queries(weights: jax.Array) -> jax.Array:
  """Eq. (17) inside a jitted step: one host callback for the whole batch.

  weights [B, N_p, N_p] -> perm [B, N_p] int32, constant w.r.t. the weights.
  """
  weights = jax.lax.stop_gradient(weights)
  result = jax.ShapeDtypeStruct(weights.shape[:2], jnp.int32)
  return jax.pure_callback(solve_assignments_on_host, result, weights,
                           vmap_method='expand_dims')


def matched_weights(weights: jax.Array, perm: jax.Array) -> jax.Array:
  """w(e) for e in M: [B, N_p, N_p], [B, N_p] -> [B, N_p]."""
  return jnp.take_along_axis(weights, perm[..., None], axis=-1)[..., 0]


def feature_distill_loss(weights: jax.Array, perm: jax.Array) -> jax.Array:
  """Eq. (18), averaged over the batch: -mean_b sum_k1 W[b, k1, perm[b, k1]]."""
  return -jnp.mean(jnp.sum(matched_weights(weights, perm), axis=-1))


def logit_distill_loss(cross_logits: jax.Array, partner_self_logits: jax.Array,
                       perm: jax.Array) -> jax.Array:
  """Eq. (19), averaged over the batch.

  Args:
    cross_logits: [B, N_p, K], logits of f^{V,I}_u (teacher, gradient stopped).
    partner_self_logits: [B, N_p, K], logits of the partner's f^{V,V}_v (student).
    perm: [B, N_p], u -> v.
  Returns:
    mean_b sum_u KL(p_u || q_perm[u]).
  """
  teacher = jax.nn.log_softmax(jax.lax.stop_gradient(cross_logits), axis=-1)
  student = jax.nn.log_softmax(
      jnp.take_along_axis(partner_self_logits, perm[..., None], axis=1), axis=-1)
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return jnp.mean(jnp.sum(kl, axis=-1))


def invert_permutations(perm: jax.Array) -> jax.Array:
  """[B, N] -> [B, N], inv[b, perm[b, k]] = k."""
  return jnp.argsort(perm, axis=-1).astype(perm.dtype)


def permutation_rank(perm: jax.Array) -> jax.Array:
  """Lexicographic rank (Lehmer code) of each permutation: [B, N] -> [B] in [0, N!)."""
  n = perm.shape[-1]
  later_smaller = jnp.sum(
      jnp.triu(jnp.ones((n, n), bool), k=1)[None] & (perm[:, None, :] < perm[:, :, None]),
      axis=-1)
  weights = jnp.array([math.factorial(n - 1 - k) for k in range(n)], jnp.int32)
  return jnp.sum(later_smaller * weights, axis=-1)


def permutation_from_rank(rank: int, n: int) -> np.ndarray:
  """Inverse of `permutation_rank` for one rank, on the host."""
  remaining = list(range(n))
  perm = []
  for k in range(n):
    index, rank = divmod(rank, math.factorial(n - 1 - k))
    perm.append(remaining.pop(index))
  return np.array(perm, dtype=np.int32)
