"""Part-aligned Center Loss (PCL, Sec. 3.2.3, Eqs. 13-15).

  c^V_j = mean_{i: y_i = y_j} f^{V,V}_i,   c^I_j = mean_{i: y_i = y_j} f^{I,I}_i      (13)
  L_pcl = sum_{i,j} g(f^{V,I}_i, c^I_j) + g(f^{I,V}_i, c^V_j)
        + s(c^I_i, c^V_j) + s(c^I_i, c^I_j) + s(c^V_i, c^V_j)                        (14)
  g(f, c) = 1[y(f) = y(c)] ||f - c||,   s(c_i, c_j) = 1[y_i != y_j] [sigma - ||c_i - c_j||]_+  (15)

Two reductions (`config.loss.pcl_reduction`, one field of the formulations):
- "sum", the paper's: Eq. (14) as written, a sum over every pair (i, j) of the
  batch (j runs over samples, so a class of K samples counts K times), of
  ||f - c||_2 over the whole refined feature [N_p, C] (its parts concatenated).
- "normalised_mean", the measured variant (docs/decisions/model_and_losses.md, "PCL scale"):
  distances are per part and averaged over parts, and each of the five sums is
  divided by its number of valid pairs (so the weight does not depend on the
  batch size).
The features they compare (`config.loss.pcl_features`, the same in both formulations):
- "unit_parts": each part feature L2-normalised first, so that sigma = 0.6
  (Sec. 4.1) is a distance on the scale of unit vectors, as at inference, where
  parts are compared by their cosines (Sec. 3.4). The paper does not say what
  scale Eq. (15) works on; its margin is only ever active on this one
  (docs/decisions/model_and_losses.md, "The scale of Eq. 15").
- "raw": the TSAA outputs as they are ("sum" only: the measured mean is the
  normalised one).
The separation terms run over all pairs of samples of different classes in the
*global* batch: with `axis_name` set, centroids are gathered from every device,
so a batch split across devices gives the loss of the whole batch (for "sum",
each device's gather term is scaled by the device count, so that the mean over
devices, which the train step takes, is the sum over the whole batch).
"""

import jax
import jax.numpy as jnp

from cal_jax.models.normalize import l2_normalize


def class_centroids(features: jax.Array, labels: jax.Array) -> jax.Array:
  """Eq. (13) per sample: c_j for every j. features [B, N_p, C], labels [B] -> [B, N_p, C]."""
  same = (labels[:, None] == labels[None, :]).astype(features.dtype)
  return jnp.einsum('ij,jkc->ikc', same / jnp.sum(same, axis=1, keepdims=True), features)


REDUCTIONS = ('sum', 'normalised_mean')
FEATURES = ('unit_parts', 'raw')


def feature_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """||a - b||_2 of whole refined features. [..., N_p, C] x [..., N_p, C] -> [...]."""
  return jnp.sqrt(jnp.sum(jnp.square(a - b), axis=(-2, -1)) + 1e-12)


def part_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean over parts of the per-part L2 distance. [..., N_p, C] x [..., N_p, C] -> [...]."""
  return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(a - b), axis=-1) + 1e-12), axis=-1)


def separation(
  centroids_a: jax.Array,
  labels_a: jax.Array,
  centroids_b: jax.Array,
  labels_b: jax.Array,
  margin: float,
  reduction: str = 'normalised_mean',
) -> jax.Array:
  """Sum ("sum") or mean over pairs of different labels of [margin - ||c_a - c_b||]_+ (Eq. 15)."""
  distance = feature_distance if reduction == 'sum' else part_distance
  dist = distance(centroids_a[:, None], centroids_b[None, :])
  different = (labels_a[:, None] != labels_b[None, :]).astype(dist.dtype)
  total = jnp.sum(jax.nn.relu(margin - dist) * different)
  return total if reduction == 'sum' else total / jnp.maximum(jnp.sum(different), 1.0)


def gather_sum(
  features: jax.Array, centroids: jax.Array, labels: jax.Array, all_labels: jax.Array
) -> jax.Array:
  """sum_{i, j} 1[y_i = y_j] ||f_i - c_j|| of Eq. (14), j over `all_labels`: every c_j of
  i's class is i's centroid, so this is sum_i n(y_i) ||f_i - c_{y_i}||."""
  count = jnp.sum(labels[:, None] == all_labels[None, :], axis=1).astype(features.dtype)
  return jnp.sum(count * feature_distance(features, centroids))


def part_center_loss(
  f_vv: jax.Array,
  f_ii: jax.Array,
  f_vi: jax.Array,
  f_iv: jax.Array,
  labels_visible: jax.Array,
  labels_infrared: jax.Array,
  margin: float,
  axis_name: str | None = None,
  reduction: str = 'normalised_mean',
  features: str = 'unit_parts',
) -> jax.Array:
  """L_pcl of Eq. (14).

  Args:
    f_vv, f_ii: self-refined features [B, N_p, C] of the visible / infrared samples.
    f_vi: f^{V,I} [B, N_p, C], labelled by the infrared sample whose queries it used.
    f_iv: f^{I,V} [B, N_p, C], labelled by the visible sample whose queries it used.
    labels_visible, labels_infrared: [B].
    margin: sigma.
    axis_name: mapped axis over which the batch is split, or None.
    reduction: one of REDUCTIONS (see the module doc).
    features: one of FEATURES (see the module doc).
  Returns:
    scalar loss.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(
      f'config.loss.pcl_reduction must be one of {", ".join(REDUCTIONS)}, got {reduction!r}'
    )
  if features not in FEATURES:
    raise ValueError(
      f'config.loss.pcl_features must be one of {", ".join(FEATURES)}, got {features!r}'
    )
  if features == 'raw' and reduction != 'sum':
    raise ValueError(
      "config.loss.pcl_features='raw' goes with config.loss.pcl_reduction='sum' only: the "
      "normalised mean works on unit parts (set pcl_features='unit_parts')"
    )
  if features == 'unit_parts':
    f_vv, f_ii, f_vi, f_iv = (l2_normalize(f) for f in (f_vv, f_ii, f_vi, f_iv))
  c_v = class_centroids(f_vv, labels_visible)
  c_i = class_centroids(f_ii, labels_infrared)
  gather_all = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
  if reduction == 'normalised_mean':
    gather = jnp.mean(part_distance(f_vi, c_i)) + jnp.mean(part_distance(f_iv, c_v))
  else:
    devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    all_v = labels_visible if axis_name is None else gather_all(labels_visible)
    all_i = labels_infrared if axis_name is None else gather_all(labels_infrared)
    gather = devices * (
      gather_sum(f_vi, c_i, labels_infrared, all_i) + gather_sum(f_iv, c_v, labels_visible, all_v)
    )

  if axis_name is not None:
    c_v, c_i = gather_all(c_v), gather_all(c_i)
    labels_visible, labels_infrared = gather_all(labels_visible), gather_all(labels_infrared)
  separate = (
    separation(c_i, labels_infrared, c_v, labels_visible, margin, reduction)
    + separation(c_i, labels_infrared, c_i, labels_infrared, margin, reduction)
    + separation(c_v, labels_visible, c_v, labels_visible, margin, reduction)
  )
  return gather + separate
