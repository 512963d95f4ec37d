"""The total CAL objective (Eq. 20):

  L = L_id + L_pcl + lambda_1 L_kd1 + lambda_2 L_kd2 + lambda_3 L_dis + lambda_4 L_div

L_id is the cross-entropy of the BNNeck classifier on every refined part
feature (self and cross, all parts) plus, with weight `loss.global_id`, on the
globally pooled feature map (the AGW baseline's loss). Every term is a mean
over the samples of the batch (both modalities), so that averaging per-device
values over devices gives the value of the whole batch.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cal_jax.losses import match_distill, metric_losses
from cal_jax.losses.part_center_loss import part_center_loss
from cal_jax.losses.region_losses import (
  attention_diversity_loss,
  attention_guidance_loss,
  discriminability_loss,
  diversity_loss,
)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy; labels broadcast over the middle axes of logits [B, ..., K]."""
  labels = jnp.broadcast_to(
    labels.reshape(labels.shape + (1,) * (logits.ndim - 2)), logits.shape[:-1]
  )
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _metric_loss(
  outputs: dict[str, jax.Array],
  labels_visible: jax.Array,
  labels_infrared: jax.Array,
  weights: ml_collections.ConfigDict,
  axis_name: str | None,
  cameras: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """L_pcl of Eq. (14), or Table 4's replacement for it (`loss.pcl_form`)."""
  form = weights.pcl_form
  if form == 'pcl':
    return part_center_loss(
      outputs['f_vv'],
      outputs['f_ii'],
      outputs['f_vi'],
      outputs['f_iv'],
      labels_visible,
      labels_infrared,
      weights.pcl_margin,
      axis_name,
      reduction=weights.pcl_reduction,
      features=weights.pcl_features,
    )
  if form == 'triplet':
    return metric_losses.batch_hard_triplet_loss(
      jnp.concatenate([outputs['f_vv'], outputs['f_ii']]),
      jnp.concatenate([labels_visible, labels_infrared]),
      axis_name=axis_name,
    )
  if form == 'center':
    refined = jnp.concatenate([outputs[k] for k in ('f_vv', 'f_ii', 'f_vi', 'f_iv')])
    labels = jnp.concatenate([labels_visible, labels_infrared, labels_infrared, labels_visible])
    return metric_losses.center_loss(refined, labels, outputs['class_centers'])
  if form == 'ica_cca':
    if cameras is None:
      raise ValueError("config.loss.pcl_form='ica_cca' needs the batch's camera classes ('camera')")
    # MCLNet's two losses on the self-refined features (the inference path), summed.
    features = jnp.concatenate([outputs['f_vv'], outputs['f_ii']])
    margins = (weights.mcca_rho, weights.mcca_sigma)
    ica = metric_losses.mcca_loss(
      features,
      jnp.concatenate([labels_visible, labels_infrared]),
      outputs['class_centers'],
      *margins,
      axis_name,
    )
    cca = metric_losses.mcca_loss(
      features, jnp.concatenate(cameras), outputs['camera_centers'], *margins, axis_name
    )
    return ica + cca
  raise ValueError(f'config.loss.pcl_form must be one of {metric_losses.PCL_FORMS}, got {form!r}')


def cal_objective(
  outputs: dict[str, jax.Array],
  labels_visible: jax.Array,
  labels_infrared: jax.Array,
  partner_of_infrared: jax.Array,
  partner_of_visible: jax.Array,
  weights: ml_collections.ConfigDict,
  axis_name: str | None = None,
  cameras: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """Eq. (20) from the outputs of `CAL.__call__`.

  Args:
    outputs: the model's training outputs.
    labels_visible, labels_infrared: [B] identity labels of the two halves.
    partner_of_infrared, partner_of_visible: [B] partner indices (see CAL).
    weights: `config.loss` (id, global_id, pcl, kd1, kd2, dis, div, pcl_margin,
      kd1_form, query_matching, stop_teacher_gradient, attention_div,
      attention_div_form, attention_guidance, pcl_form).
    axis_name: mapped axis the batch is split over, or None.
    cameras: (cameras_v, cameras_i), the camera classes of the two halves, for
      `loss.pcl_form="ica_cca"` (MCLNet's CCA); None otherwise.
  Returns:
    (total loss, dict of each unweighted term and the total, matchings [2B, N_p]
    as infrared part -> visible part permutations).
  """
  labels_both = jnp.concatenate([labels_visible, labels_infrared])
  loss_global_id = cross_entropy(outputs['global_logits'], labels_both)
  loss_id = jnp.mean(
    jnp.stack(
      [
        cross_entropy(outputs['logits_vv'], labels_visible),
        cross_entropy(outputs['logits_ii'], labels_infrared),
        cross_entropy(outputs['logits_vi'], labels_infrared),
        cross_entropy(outputs['logits_iv'], labels_visible),
      ]
    )
  )

  loss_pcl = _metric_loss(outputs, labels_visible, labels_infrared, weights, axis_name, cameras)

  if 'part_logits_vis' in outputs:  # DRM's regions (Table 4's LV and HS have none)
    loss_dis = 0.5 * (
      discriminability_loss(outputs['part_logits_vis'], labels_visible)
      + discriminability_loss(outputs['part_logits_ir'], labels_infrared)
    )
    loss_div = 0.5 * (
      diversity_loss(outputs['selected_vis']) + diversity_loss(outputs['selected_ir'])
    )
    # Not in the paper: each part's self-refinement map S pulled towards the region
    # DRM selected for it, weight `attention_guidance` (0 = the paper; the paper's
    # Fig. 4 shows TSAA finding DRM's regions, docs/decisions/model_and_losses.md "Guiding TSAA").
    attendable = outputs.get('attention_mask')  # model.attention_border > 0
    loss_guidance = 0.5 * (
      attention_guidance_loss(outputs['sim_vv'], outputs['selected_vis'], attendable)
      + attention_guidance_loss(outputs['sim_ii'], outputs['selected_ir'], attendable)
    )
  else:
    loss_dis = loss_div = loss_guidance = jnp.zeros((), loss_id.dtype)
  # Not in the paper: a diversity term on the TSAA maps of the self-refinement
  # (the inference path), weight `attention_div` (0 = the paper). It keeps the
  # part queries attending different tokens (docs/decisions/model_and_losses.md, "L_kd1: the
  # attention collapse").
  loss_attention_div = 0.5 * (
    attention_diversity_loss(outputs['sim_vv'], weights.attention_div_form)
    + attention_diversity_loss(outputs['sim_ii'], weights.attention_div_form)
  )

  # MatchDistill, visible direction first: infrared sample i's queries (k1)
  # against its visible partner's own queries (k2), on the partner's visible
  # map; then the infrared direction: visible sample j's queries against its
  # infrared partner's. The cross-refined map is the teacher of both levels.
  stop = jax.lax.stop_gradient if weights.stop_teacher_gradient else (lambda x: x)
  teacher = jnp.concatenate([stop(outputs['sim_vi']), stop(outputs['sim_iv'])])
  student = jnp.concatenate(
    [outputs['sim_vv'][partner_of_infrared], outputs['sim_ii'][partner_of_visible]]
  )
  weights_both = match_distill.edge_weights(teacher, student)  # Eq. (16)
  perm = (
    match_distill.match_queries(weights_both)
    if weights.query_matching
    else jnp.broadcast_to(
      jnp.arange(weights_both.shape[1], dtype=jnp.int32), weights_both.shape[:2]
    )
  )
  loss_kd1 = match_distill.map_distill_loss(teacher, student, perm, weights.kd1_form)
  batch = labels_visible.shape[0]
  cross_logits = jnp.concatenate([outputs['logits_vi'], outputs['logits_iv']])
  # The students: the self-refined logits, or their copies whose attention maps
  # L_kd2 cannot move (config.loss.kd2_attention_gradient=False).
  student_vv = outputs.get('logits_vv_kd2', outputs['logits_vv'])
  student_ii = outputs.get('logits_ii_kd2', outputs['logits_ii'])
  partner_self_logits = jnp.concatenate(
    [student_vv[partner_of_infrared], student_ii[partner_of_visible]]
  )
  loss_kd2 = match_distill.logit_distill_loss(
    cross_logits, partner_self_logits, perm, stop_teacher=weights.stop_teacher_gradient
  )

  total = (
    weights.id * loss_id
    + weights.global_id * loss_global_id
    + weights.pcl * loss_pcl
    + weights.kd1 * loss_kd1
    + weights.kd2 * loss_kd2
    + weights.dis * loss_dis
    + weights.div * loss_div
    + weights.attention_div * loss_attention_div
    + weights.attention_guidance * loss_guidance
  )
  terms = {
    'loss': total,
    'id': loss_id,
    'global_id': loss_global_id,
    'pcl': loss_pcl,
    'kd1': loss_kd1,
    'kd2': loss_kd2,
    'dis': loss_dis,
    'div': loss_div,
    'attention_div': loss_attention_div,
    'attention_guidance': loss_guidance,
  }
  # Both directions as infrared part -> visible part: the visible direction
  # maps k1 (infrared) -> k2 (visible) already; the infrared one is inverted.
  ir_to_vis = jnp.concatenate([perm[:batch], match_distill.invert_permutations(perm[batch:])])
  return total, terms, ir_to_vis
