"""Table 4's replacements for PCL: the batch-hard triplet loss and the center loss.

Both work on the same L2-normalised part features as PCL and measure
distances the same way (`part_center_loss.part_distance`: the per-part L2
distance averaged over parts), so that the weight `loss.pcl` and the scale of
unit vectors carry over; `loss.pcl_form` picks the loss.

  triplet  (Hermans et al. [11], as AGW): for each self-refined feature of the
           batch (both modalities), [m + max_pos d - min_neg d]_+, m = 0.3,
           positives and negatives from the global batch (either modality).
  center   (Wen et al. [37]): 1/2 ||f - c_y||^2 per part, averaged over the
           refined features (self and cross) and parts, with one learned
           centre per class and part (`CAL.class_centers`), trained by the
           optimiser like every other parameter (Wen's separate centre update
           rate is not used).
  ica_cca  (MCLNet, Hao et al. [7], the authors' `MCCALossID` / `MCCALossCAM`): the
           same centre-aggregation loss once with identity centres (ICA) and
           once with camera centres (CCA), on the self-refined features, per
           part and averaged over parts (`mcca_loss`).
"""

import jax
import jax.numpy as jnp

from cal_jax.losses.part_center_loss import part_distance
from cal_jax.models.normalize import l2_normalize

PCL_FORMS = ('pcl', 'triplet', 'center', 'ica_cca')  # Eq. (14) | Table 4's alternatives
TRIPLET_MARGIN = 0.3  # AGW / Hermans et al.


def batch_hard_triplet_loss(
  features: jax.Array,
  labels: jax.Array,
  margin: float = TRIPLET_MARGIN,
  axis_name: str | None = None,
) -> jax.Array:
  """Mean over anchors of [margin + hardest positive - hardest negative]_+.

  Args:
    features: [B, N_p, C] (L2-normalised per part here).
    labels: [B].
    margin: m.
    axis_name: mapped axis the batch is split over: positives and negatives
      are then mined from every device's features.
  """
  features = l2_normalize(features)
  others, other_labels = features, labels
  if axis_name is not None:
    others = jax.lax.all_gather(features, axis_name, tiled=True)
    other_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
  dist = part_distance(features[:, None], others[None, :])  # [B, B_all]
  same = labels[:, None] == other_labels[None, :]
  hardest_positive = jnp.max(jnp.where(same, dist, -jnp.inf), axis=1)
  hardest_negative = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
  return jnp.mean(jax.nn.relu(margin + hardest_positive - hardest_negative))


def center_loss(features: jax.Array, labels: jax.Array, centers: jax.Array) -> jax.Array:
  """1/2 ||f - c_y||^2 per part, averaged over samples and parts.

  Args:
    features: [B, N_p, C] (L2-normalised per part here).
    labels: [B].
    centers: [K, N_p, C], one learned centre per class and part.
  """
  features = l2_normalize(features)
  return 0.5 * jnp.mean(jnp.sum(jnp.square(features - centers[labels]), axis=-1))


def mcca_loss(
  features: jax.Array,
  labels: jax.Array,
  centers: jax.Array,
  rho: float,
  sigma: float,
  axis_name: str | None = None,
) -> jax.Array:
  """MCLNet's centre aggregation, per part, averaged over parts.

  With d_i = ||x_i - c_{y_i}||^2 (x_i L2-normalised), B samples and n_k of class k:

    L_push = max(rho - (1/B) sum_i min_{k != y_i} ||c_{y_i} - c_k||^2, 0)
    L_pull = max((1/B) sum_i d_i - (1/B) sum_{k in batch} n_k min_{i: y_i = k} d_i - sigma, 0)

  and the loss is L_pull + L_push: each sample is pulled towards its centre no
  closer than its class's nearest sample by a margin sigma, and each centre is
  pushed to at least rho from the nearest other centre.

  Args:
    features: [B, N_p, C] (L2-normalised per part here).
    labels: [B] classes in [0, K).
    centers: [K, N_p, C].
    rho, sigma: the margins (`loss.mcca_rho`, `loss.mcca_sigma`).
    axis_name: mapped axis the batch is split over: the means and each class's
      nearest sample are then those of the global batch (a camera spans devices).
  """
  features = l2_normalize(features)
  num_classes = centers.shape[0]
  own = centers[labels]  # [B, N_p, C]
  d = jnp.sum(jnp.square(features - own), axis=-1)  # [B, N_p]
  between = jnp.sum(jnp.square(own[:, None] - centers[None]), axis=-1)  # [B, K, N_p]
  is_own = (labels[:, None] == jnp.arange(num_classes)[None])[..., None]
  nearest_other = jnp.min(jnp.where(is_own, jnp.inf, between), axis=1)  # [B, N_p]
  mean = lambda x: jnp.mean(x, axis=0)
  d_all, labels_all = d, labels
  if axis_name is not None:
    mean = lambda x: jax.lax.pmean(jnp.mean(x, axis=0), axis_name)
    d_all = jax.lax.all_gather(d, axis_name, tiled=True)
    labels_all = jax.lax.all_gather(labels, axis_name, tiled=True)
  push = jnp.maximum(rho - mean(nearest_other), 0.0)
  same = labels[:, None] == labels_all[None, :]  # [B, B_all]
  # n_k min_{i in k} d_i summed over classes = sum over samples of their class's minimum.
  class_min = jnp.min(jnp.where(same[..., None], d_all[None], jnp.inf), axis=1)  # [B, N_p]
  pull = jnp.maximum(mean(d) - mean(class_min) - sigma, 0.0)
  return jnp.mean(pull + push)
