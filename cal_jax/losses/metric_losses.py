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
"""

import jax
import jax.numpy as jnp

from cal_jax.losses.part_center_loss import part_distance
from cal_jax.models.normalize import l2_normalize

PCL_FORMS = ('pcl', 'triplet', 'center')  # Eq. (14) | Table 4's alternatives
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
