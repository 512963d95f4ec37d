"""Part-aligned Center Loss (PCL, Sec. 3.2.3, Eqs. 13-15).

  c^V_j = mean_{i: y_i = y_j} f^{V,V}_i,   c^I_j = mean_{i: y_i = y_j} f^{I,I}_i      (13)
  L_pcl = sum_{i,j} g(f^{V,I}_i, c^I_j) + g(f^{I,V}_i, c^V_j)
        + s(c^I_i, c^V_j) + s(c^I_i, c^I_j) + s(c^V_i, c^V_j)                        (14)
  g(f, c) = 1[y(f) = y(c)] ||f - c||,   s(c_i, c_j) = 1[y_i != y_j] [sigma - ||c_i - c_j||]_+  (15)

Choices the paper leaves open (docs/decisions.md): each part feature is
L2-normalised before the loss, distances are per part and averaged over parts
(so sigma = 0.6 is on the scale of unit vectors), and each of the five sums is
normalised by its number of valid pairs (a mean, not a sum, so the weight 1 of
Eq. (20) does not depend on the batch size). The gather terms pair each
cross-refined feature with the centroid of its own class; the separation terms
run over all pairs of samples of different classes in the *global* batch: with
`axis_name` set, centroids are gathered from every device, so a batch split
across devices gives the loss of the whole batch.
"""

import jax
import jax.numpy as jnp

from cal_jax.models.normalize import l2_normalize


def class_centroids(features: jax.Array, labels: jax.Array) -> jax.Array:
  """Eq. (13) per sample: c_j for every j. features [B, N_p, C], labels [B] -> [B, N_p, C]."""
  same = (labels[:, None] == labels[None, :]).astype(features.dtype)
  return jnp.einsum('ij,jkc->ikc', same / jnp.sum(same, axis=1, keepdims=True), features)


def part_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean over parts of the per-part L2 distance. [..., N_p, C] x [..., N_p, C] -> [...]."""
  return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(a - b), axis=-1) + 1e-12), axis=-1)


def separation(
  centroids_a: jax.Array,
  labels_a: jax.Array,
  centroids_b: jax.Array,
  labels_b: jax.Array,
  margin: float,
) -> jax.Array:
  """Mean over pairs of different labels of [margin - ||c_a - c_b||]_+ (Eq. 15)."""
  dist = part_distance(centroids_a[:, None], centroids_b[None, :])
  different = (labels_a[:, None] != labels_b[None, :]).astype(dist.dtype)
  return jnp.sum(jax.nn.relu(margin - dist) * different) / jnp.maximum(jnp.sum(different), 1.0)


def part_center_loss(
  f_vv: jax.Array,
  f_ii: jax.Array,
  f_vi: jax.Array,
  f_iv: jax.Array,
  labels_visible: jax.Array,
  labels_infrared: jax.Array,
  margin: float,
  axis_name: str | None = None,
) -> jax.Array:
  """L_pcl of Eq. (14).

  Args:
    f_vv, f_ii: self-refined features [B, N_p, C] of the visible / infrared samples.
    f_vi: f^{V,I} [B, N_p, C], labelled by the infrared sample whose queries it used.
    f_iv: f^{I,V} [B, N_p, C], labelled by the visible sample whose queries it used.
    labels_visible, labels_infrared: [B].
    margin: sigma.
    axis_name: mapped axis over which the batch is split, or None.
  Returns:
    scalar loss.
  """
  f_vv, f_ii, f_vi, f_iv = (l2_normalize(f) for f in (f_vv, f_ii, f_vi, f_iv))
  c_v = class_centroids(f_vv, labels_visible)
  c_i = class_centroids(f_ii, labels_infrared)
  gather = jnp.mean(part_distance(f_vi, c_i)) + jnp.mean(part_distance(f_iv, c_v))

  if axis_name is not None:
    gather_all = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
    c_v, c_i = gather_all(c_v), gather_all(c_i)
    labels_visible, labels_infrared = gather_all(labels_visible), gather_all(labels_infrared)
  separate = (
    separation(c_i, labels_infrared, c_v, labels_visible, margin)
    + separation(c_i, labels_infrared, c_i, labels_infrared, margin)
    + separation(c_v, labels_visible, c_v, labels_visible, margin)
  )
  return gather + separate
