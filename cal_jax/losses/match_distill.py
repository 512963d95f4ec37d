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

Eq. (18) as written is minimised by identical one-hot maps: maximising <t, s>
over the simplex puts all of s on the argmax of t, and teacher and student
share the TSAA MLPs, so both collapse onto one token (docs/decisions/model_and_losses.md,
"L_kd1: the attention collapse and the form of the feature-level loss").
`map_distill_loss` keeps the literal form as `form='dot'` and offers forms
whose optimum is the teacher's map itself, not a peak (KD1_FORMS).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment


def edge_weights(cross_similarity: jax.Array, partner_self_similarity: jax.Array) -> jax.Array:
  """Eq. (16). [B, N_p, H*W] x [B, N_p, H*W] -> W [B, N_p (k1), N_p (k2)]."""
  return jnp.einsum('bkn,bln->bkl', cross_similarity, partner_self_similarity)


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
  # float32 to the host whatever the compute dtype (a bfloat16 array has no numpy dtype).
  weights = jax.lax.stop_gradient(weights).astype(jnp.promote_types(weights.dtype, jnp.float32))
  result = jax.ShapeDtypeStruct(weights.shape[:2], jnp.int32)
  return jax.pure_callback(solve_assignments_on_host, result, weights, vmap_method='expand_dims')


def matched_weights(weights: jax.Array, perm: jax.Array) -> jax.Array:
  """w(e) for e in M: [B, N_p, N_p], [B, N_p] -> [B, N_p]."""
  return jnp.take_along_axis(weights, perm[..., None], axis=-1)[..., 0]


def feature_distill_loss(weights: jax.Array, perm: jax.Array) -> jax.Array:
  """Eq. (18), averaged over the batch: -mean_b sum_k1 W[b, k1, perm[b, k1]]."""
  return -jnp.mean(jnp.sum(matched_weights(weights, perm), axis=-1))


def logit_distill_loss(
  cross_logits: jax.Array,
  partner_self_logits: jax.Array,
  perm: jax.Array,
  stop_teacher: bool = True,
) -> jax.Array:
  """Eq. (19), averaged over the batch.

  Args:
    cross_logits: [B, N_p, K], logits of f^{V,I}_u (teacher, gradient stopped).
    partner_self_logits: [B, N_p, K], logits of the partner's f^{V,V}_v (student).
    perm: [B, N_p], u -> v.
    stop_teacher: False lets the gradient reach the teacher too (an ablation).
  Returns:
    mean_b sum_u KL(p_u || q_perm[u]).
  """
  if stop_teacher:
    cross_logits = jax.lax.stop_gradient(cross_logits)
  teacher = jax.nn.log_softmax(cross_logits, axis=-1)
  student = jax.nn.log_softmax(
    jnp.take_along_axis(partner_self_logits, perm[..., None], axis=1), axis=-1
  )
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return jnp.mean(jnp.sum(kl, axis=-1))


KD1_FORMS = ('dot', 'cosine', 'kl', 'mse')
MAP_EPSILON = 1e-12  # floor of the attention maps before a logarithm


def matched_maps(student: jax.Array, perm: jax.Array) -> jax.Array:
  """The student's map matched to each teacher query: [B, N_p, H*W], [B, N_p] -> [B, N_p, H*W]."""
  return jnp.take_along_axis(student, perm[..., None], axis=1)


def map_distance(teacher: jax.Array, student: jax.Array, form: str) -> jax.Array:
  """Per-pair feature-level distillation term of two maps [..., H*W] -> [...].

  dot:     -<t, s>                 Eq. (18) literally; its optimum is a one-hot s
  cosine:  1 - <t, s> / |t| |s|    optimum s proportional to t
  kl:      KL(t || s)              optimum s = t
  mse:     |t - s|^2               optimum s = t
  """
  if form == 'dot':
    return -jnp.sum(teacher * student, axis=-1)
  if form == 'cosine':
    norms = jnp.linalg.norm(teacher, axis=-1) * jnp.linalg.norm(student, axis=-1)
    return 1.0 - jnp.sum(teacher * student, axis=-1) / jnp.maximum(norms, MAP_EPSILON)
  if form == 'kl':
    log_t = jnp.log(jnp.maximum(teacher, MAP_EPSILON))
    log_s = jnp.log(jnp.maximum(student, MAP_EPSILON))
    return jnp.sum(teacher * (log_t - log_s), axis=-1)
  if form == 'mse':
    return jnp.sum(jnp.square(teacher - student), axis=-1)
  raise ValueError(f'config.loss.kd1_form must be one of {", ".join(KD1_FORMS)}, got {form!r}')


def map_distill_loss(
  teacher: jax.Array, student: jax.Array, perm: jax.Array, form: str = 'dot'
) -> jax.Array:
  """L_kd1 over the matched pairs, averaged over the batch.

  Args:
    teacher: [B, N_p, H*W] cross-refined maps (k1); the caller stops their gradient.
    student: [B, N_p, H*W] the partner's self-refined maps (k2).
    perm: [B, N_p] the matching of Eq. (17), k1 -> k2.
    form: one of KD1_FORMS; 'dot' equals `feature_distill_loss` on the edge weights.
  Returns:
    mean_b sum_k1 map_distance(teacher[b, k1], student[b, perm[b, k1]]).
  """
  return jnp.mean(jnp.sum(map_distance(teacher, matched_maps(student, perm), form), axis=-1))


def invert_permutations(perm: jax.Array) -> jax.Array:
  """[B, N] -> [B, N], inv[b, perm[b, k]] = k."""
  return jnp.argsort(perm, axis=-1).astype(perm.dtype)


def permutation_rank(perm: jax.Array) -> jax.Array:
  """Lexicographic rank (Lehmer code) of each permutation: [B, N] -> [B] in [0, N!)."""
  n = perm.shape[-1]
  later_smaller = jnp.sum(
    jnp.triu(jnp.ones((n, n), bool), k=1)[None] & (perm[:, None, :] < perm[:, :, None]), axis=-1
  )
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
