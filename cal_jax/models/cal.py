"""The CAL network: backbone, DRM per modality, shared TSAA, and classifiers.

Training (`__call__`) takes the visible and the infrared half of a batch and,
for each sample, the index of its partner of the same identity in the other
half, and returns everything the objective of Eq. (20) needs:

  self-refinement  (Eq. 12): f^{V,V}_i = A(T^V_i; P^V_i),  f^{I,I}_i = A(T^I_i; P^I_i)
  cross-refinement (Eq. 11): f^{V,I}_i = A(T^V_j; P^I_i),  f^{I,V}_i = A(T^I_j; P^V_i)

where j is the partner of i. Cross-refined features are indexed, and
labelled, by the sample whose queries they use.

Inference (`embed`) needs one modality only: the self-refined part features
of each image, after the BNNeck, L2-normalised per part, so that the sum over
parts of cosine similarities (Sec. 3.4) is one dot product of the flattened
embeddings.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cal_jax.data.modality import INFRARED, VISIBLE
from cal_jax.models import attention_adapter, resnet
from cal_jax.models import part_queries as part_queries_lib
from cal_jax.models.batch_norm import BatchNorm
from cal_jax.models.normalize import l2_normalize
from cal_jax.models.region_mining import RegionMining

classifier_init = nn.initializers.normal(stddev=0.001)  # AGW's classifier init


class CAL(nn.Module):
  """Concordant Attention Learning network.

  Attributes: see `configs/default.py`, `config.model`; `num_classes` is the
  number of training identities.
  """

  num_classes: int
  depth: int = 50
  width: int = 64
  last_stride: int = 1
  modality_specific_stem: bool = True
  num_parts: int = 4
  select_ratio: float = 0.6
  pool_sizes: Sequence[int] = (1, 3, 5)
  shared_region_mining: bool = False
  adapter_hidden: int = 512
  adapter_dim: int = 256
  channel_reduction: int = 16
  part_queries: str = 'drm'  # Table 4: 'learnable' (LV) | 'horizontal' (HS)
  attention_similarity: str = 'tsaa'  # Table 4: 'scaled_dot' (SD)
  channel_attention: bool = True  # Table 4: False is "w/o CA"
  attention_border: int = 0  # tokens this near the map's edge are left out of Eq. (9)
  attention_centring: bool = False  # IN(T) centred per position over images (TSAA doc)
  # L_id's classifier of the refined parts: 'shared' by every part, or 'per_part': one per
  # part query and modality, the query's (f^{V,I} with the infrared query k: infrared k's).
  id_classifier: str = 'shared'
  class_centers: bool = False  # learned centres of Table 4's "PCL -> Center loss", ICA
  camera_centers: int = 0  # camera classes of Table 4's ICA&CCA (CCA's centres); 0: none
  # False: L_kd2's students are also computed with their TSAA maps' gradient stopped
  # ('logits_vv_kd2', 'logits_ii_kd2'), so that L_kd2 cannot move the attention.
  kd2_attention_gradient: bool = True
  dtype: Any = None  # the backbone's computation dtype; None: its inputs' (module doc)
  remat: Sequence[int] = ()  # ResNet stages (1-4) whose blocks are rematerialised
  remat_nested: bool = True  # ... and each of those stages as a whole (resnet.Stages)
  axis_name: str | None = None

  def setup(self):
    self.stem_visible = resnet.Stem(self.width, self.axis_name, self.dtype)
    self.stem_infrared = (
      resnet.Stem(self.width, self.axis_name, self.dtype)
      if self.modality_specific_stem
      else self.stem_visible
    )
    self.stages = resnet.Stages(
      self.depth,
      self.width,
      self.last_stride,
      self.axis_name,
      self.dtype,
      tuple(self.remat),
      self.remat_nested,
    )
    if self.part_queries not in part_queries_lib.PART_QUERIES:
      raise ValueError(
        f'config.model.part_queries must be one of '
        f'{part_queries_lib.PART_QUERIES}, got {self.part_queries!r}'
      )
    # The module that turns a feature map into part queries P: DRM, or one of
    # Table 4's alternatives (named like DRM, so pictures and export find them).
    drm = {
      'drm': lambda: RegionMining(
        self.num_parts, self.select_ratio, self.num_classes, tuple(self.pool_sizes)
      ),
      'learnable': lambda: part_queries_lib.LearnableQueries(self.num_parts),
      'horizontal': lambda: part_queries_lib.HorizontalStripes(self.num_parts),
    }[self.part_queries]
    self.region_mining_visible = drm()
    self.region_mining_infrared = self.region_mining_visible if self.shared_region_mining else drm()
    self.adapter = attention_adapter.AttentionAdapter(
      resnet.output_channels(self.depth, self.width),
      self.adapter_hidden,
      self.adapter_dim,
      self.channel_reduction,
      self.attention_similarity,
      self.channel_attention,
      self.attention_centring,
      self.axis_name,
    )
    # BNNeck (AGW): batch norm without shift before a bias-free classifier.
    self.global_neck = BatchNorm(use_bias=False, axis_name=self.axis_name)
    self.global_classifier = nn.Dense(self.num_classes, use_bias=False, kernel_init=classifier_init)
    self.part_neck = BatchNorm(use_bias=False, axis_name=self.axis_name)
    if self.id_classifier not in ID_CLASSIFIERS:
      raise ValueError(
        f'config.model.id_classifier must be one of {ID_CLASSIFIERS}, got {self.id_classifier!r}'
      )
    if self.id_classifier == 'shared':
      self.part_classifier = nn.Dense(self.num_classes, use_bias=False, kernel_init=classifier_init)
    else:  # [modality of the query, part, C, K]
      channels = resnet.output_channels(self.depth, self.width)
      self.part_classifiers = self.param(
        'part_classifiers',
        classifier_init,
        (2, self.num_parts, channels, self.num_classes),
        jnp.float32,
      )
    if self.class_centers:  # [K, N_p, C], for `metric_losses.center_loss` and ICA
      self.centers = self._centres('class_centers', self.num_classes)
    if self.camera_centers:  # [cameras, N_p, C], for `metric_losses.mcca_loss` (CCA)
      self.camera_centres = self._centres('camera_centers', self.camera_centers)

  def _centres(self, name: str, count: int) -> jax.Array:
    """`count` learned centres per part, [count, N_p, C], of norm about 1."""
    channels = resnet.output_channels(self.depth, self.width)
    return self.param(
      name,
      nn.initializers.normal(stddev=channels**-0.5),
      (count, self.num_parts, channels),
      jnp.float32,
    )

  def feature_maps(
    self, images_visible: jax.Array, images_infrared: jax.Array, train: bool
  ) -> tuple[jax.Array, jax.Array]:
    """Both halves through their stems and the shared stages: 2 x [B, h, w, C], float32."""
    x = jnp.concatenate(
      [self.stem_visible(images_visible, train), self.stem_infrared(images_infrared, train)], axis=0
    )
    maps = self.stages(x, train)
    maps = maps.astype(jnp.promote_types(maps.dtype, jnp.float32))
    return maps[: images_visible.shape[0]], maps[images_visible.shape[0] :]

  def feature_map(self, images: jax.Array, modality: int) -> jax.Array:
    """One modality through its stem and the stages, eval mode: [B, h, w, C], float32."""
    stem = self.stem_visible if modality == VISIBLE else self.stem_infrared
    maps = self.stages(stem(images, False), False)
    return maps.astype(jnp.promote_types(maps.dtype, jnp.float32))

  def __call__(
    self,
    images_visible: jax.Array,
    images_infrared: jax.Array,
    partner_of_infrared: jax.Array,
    partner_of_visible: jax.Array,
    train: bool = True,
  ) -> dict[str, jax.Array]:
    """Training forward pass.

    Args:
      images_visible: [B, H, W, 3]; images_infrared: [B, H, W, 3].
      partner_of_infrared: [B] index of a visible sample of the same identity.
      partner_of_visible: [B] index of an infrared sample of the same identity.
    Returns:
      dict with, per modality m in (vis, ir): 'global_logits' [2B, K] (visible
      first); 'part_logits_m' (Phi_k(P_k), Eq. 4; DRM only) and 'selected_m'
      (S_hat, Eq. 5); refined features 'f_vv', 'f_ii', 'f_vi', 'f_iv' [B, N_p, C],
      their similarity maps 'sim_*' [B, N_p, H*W] and classifier logits
      'logits_*' [B, N_p, K]. 'f_vi' is f^{V,I}: visible tokens of the partner,
      infrared queries of sample i.
    """
    map_v, map_i = self.feature_maps(images_visible, images_infrared, train)

    pooled = jnp.mean(jnp.concatenate([map_v, map_i], axis=0), axis=(1, 2))
    global_logits = self.global_classifier(self.global_neck(pooled, not train))

    drm_v = self.region_mining_visible(map_v)
    drm_i = self.region_mining_infrared(map_i)
    tokens_v, tokens_i = drm_v['tokens'], drm_i['tokens']
    if self.attention_centring:  # one mean per position over both modalities' images
      tokens_hat = self.adapter.encode_tokens(jnp.concatenate([tokens_v, tokens_i]), train)
      tokens_hat_v, tokens_hat_i = jnp.split(tokens_hat, 2)
    else:
      tokens_hat_v = self.adapter.encode_tokens(tokens_v)
      tokens_hat_i = self.adapter.encode_tokens(tokens_i)
    queries_hat_v = self.adapter.encode_queries(drm_v['parts'], tokens_v)
    queries_hat_i = self.adapter.encode_queries(drm_i['parts'], tokens_i)
    gates_v = self.adapter.channel_gates(drm_v['parts'])
    gates_i = self.adapter.channel_gates(drm_i['parts'])

    mask = attention_adapter.interior_tokens(*map_v.shape[1:3], self.attention_border)
    refine = attention_adapter.refine
    f_vv, sim_vv = refine(tokens_v, tokens_hat_v, queries_hat_v, gates_v, mask)
    f_ii, sim_ii = refine(tokens_i, tokens_hat_i, queries_hat_i, gates_i, mask)
    f_vi, sim_vi = refine(
      tokens_v[partner_of_infrared], tokens_hat_v[partner_of_infrared], queries_hat_i, gates_i, mask
    )
    f_iv, sim_iv = refine(
      tokens_i[partner_of_visible], tokens_hat_i[partner_of_visible], queries_hat_v, gates_v, mask
    )

    refined = [f_vv, f_ii, f_vi, f_iv]
    if not self.kd2_attention_gradient:
      # L_kd2's students: the same features, with no gradient into S (Eq. 9).
      stop = jax.lax.stop_gradient
      refined += [
        jnp.einsum('bkn,bnc->bkc', stop(sim_vv), tokens_v) * gates_v,
        jnp.einsum('bkn,bnc->bkc', stop(sim_ii), tokens_i) * gates_i,
      ]
    # The BNNeck's moments are those of the four refinements [4B, N_p, C] only.
    counted = 4 * f_vv.shape[0] if len(refined) > 4 else None
    necked = self.part_neck(jnp.concatenate(refined, axis=0), not train, statistics_rows=counted)
    if self.id_classifier == 'shared':
      logits = jnp.split(self.part_classifier(necked), len(refined), axis=0)
    else:  # each refinement by the classifiers of its queries' modality
      query_modality = (VISIBLE, INFRARED, INFRARED, VISIBLE, VISIBLE, INFRARED)
      logits = [
        jnp.einsum('bkc,kcn->bkn', x, self.part_classifiers[m])
        for x, m in zip(jnp.split(necked, len(refined), axis=0), query_modality)
      ]
    logits_vv, logits_ii, logits_vi, logits_iv = logits[:4]
    outputs = {
      'global_logits': global_logits,
      'selected_vis': drm_v['selected'],
      'selected_ir': drm_i['selected'],
      'f_vv': f_vv,
      'f_ii': f_ii,
      'f_vi': f_vi,
      'f_iv': f_iv,
      'sim_vv': sim_vv,
      'sim_ii': sim_ii,
      'sim_vi': sim_vi,
      'sim_iv': sim_iv,
      'logits_vv': logits_vv,
      'logits_ii': logits_ii,
      'logits_vi': logits_vi,
      'logits_iv': logits_iv,
    }
    if not self.kd2_attention_gradient:
      outputs |= {'logits_vv_kd2': logits[4], 'logits_ii_kd2': logits[5]}
    if mask is not None:  # the tokens S may attend (model.attention_border)
      outputs['attention_mask'] = mask
    if self.class_centers:
      outputs['class_centers'] = self.centers
    if self.camera_centers:
      outputs['camera_centers'] = self.camera_centres
    if 'part_logits' in drm_v:  # DRM only: LV and HS have no regions for Eqs. (4)-(5)
      outputs |= {'part_logits_vis': drm_v['part_logits'], 'part_logits_ir': drm_i['part_logits']}
    return outputs

  def embed(self, images: jax.Array, modality: int) -> jax.Array:
    """Inference embedding of one modality (Sec. 3.4), eval-mode batch norm.

    Args:
      images: [B, H, W, 3], all of one modality.
      modality: VISIBLE (0) or INFRARED (1), a Python int.
    Returns:
      [B, N_p * C]: per-part self-refined features after the BNNeck, each
      part L2-normalised, so <e_a, e_b> = sum_p cos(f_a,p, f_b,p).
    """
    parts = self.refined_parts(images, modality)['features']
    return l2_normalize(self.part_neck(parts, True)).reshape(images.shape[0], -1)

  def embed_global(self, images: jax.Array, modality: int) -> jax.Array:
    """The baseline's embedding: pooled map after its BNNeck, L2-normalised. -> [B, C]."""
    pooled = jnp.mean(self.feature_map(images, modality), axis=(1, 2))
    return l2_normalize(self.global_neck(pooled, True))

  def refined_parts(self, images: jax.Array, modality: int) -> dict[str, jax.Array]:
    """Self-refinement of one modality in eval mode: the inference path.

    Returns dict with 'features' f [B, N_p, C] (before the BNNeck),
    'similarity' (TSAA attention, [B, N_p, h*w]), 'scores' (DRM scores S,
    [B, h*w, N_p]) and 'selected' (S_hat), for pictures and tests.
    """
    return self._self_refinement(images, modality)[0]

  def part_maps(self, images: jax.Array, modality: int) -> dict[str, jax.Array]:
    """What Fig. 4 draws, as maps over the feature map: [B, N_p, h, w] each.

    'selected': S_hat of Eq. (3), each part's kept DRM scores (0 elsewhere);
    'attention': S of Eq. (9) in the self-refinement, A(T; P) of the image's
    own part queries. Eval mode; part k is the part the variables' prototype k
    mines (evaluation reorders the visible prototypes by M-hat first).
    """
    out, (batch, height, width) = self._self_refinement(images, modality)
    as_maps = lambda x: x.reshape(batch, -1, height, width)
    return {
      'selected': as_maps(jnp.swapaxes(out['selected'], 1, 2)),
      'attention': as_maps(out['similarity']),
    }

  def _self_refinement(
    self, images: jax.Array, modality: int
  ) -> tuple[dict[str, jax.Array], tuple[int, int, int]]:
    """`refined_parts` and the feature map's (B, h, w)."""
    if modality not in (VISIBLE, INFRARED):
      raise ValueError(
        f'modality must be {VISIBLE} (visible) or {INFRARED} (infrared), got {modality!r}'
      )
    drm = self.region_mining_visible if modality == VISIBLE else self.region_mining_infrared
    feature_map = self.feature_map(images, modality)
    mined = drm(feature_map)
    mask = attention_adapter.interior_tokens(*feature_map.shape[1:3], self.attention_border)
    features, similarity = self.adapter(mined['tokens'], mined['parts'], mined['tokens'], mask)
    return (
      {
        'features': features,
        'similarity': similarity,
        'scores': mined['scores'],
        'selected': mined['selected'],
      },
      feature_map.shape[:3],
    )


# config.model.dtype -> the backbone's computation dtype. None computes in the dtype of
# the inputs and parameters: float32 (float64 in the tests of exactness).
ID_CLASSIFIERS = ('shared', 'per_part')  # config.model.id_classifier

DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """`config.model.dtype` -> the jnp dtype of the backbone's computation."""
  if name not in DTYPES:
    raise ValueError(
      f'config.model.dtype={name!r} must be one of {sorted(DTYPES)}; float16 is not supported '
      '(no loss scaling): use bfloat16, or float32 on a GPU without bfloat16'
    )
  return DTYPES[name]


def create_model(
  model: ml_collections.ConfigDict,
  *,
  num_classes: int,
  class_centers: bool = False,
  num_cameras: int = 0,
  kd2_attention_gradient: bool = True,
  axis_name: str | None = None,
) -> CAL:
  """Builds the CAL network from the model's config section, `config.model`.

  What the objective needs of the network is given explicitly (the train state works it
  out from `config.loss`: `training.state.build_model`): `class_centers` (Table 4's
  centre losses keep one centre per class), `num_cameras` (ICA&CCA's camera centres)
  and `kd2_attention_gradient` (whether L_kd2 reaches the TSAA maps).
  """
  resnet.check_depth(model.depth)
  resnet.check_remat(model.remat)
  if model.num_parts < 1:
    raise ValueError(f'config.model.num_parts must be >= 1, got {model.num_parts}')
  if not 0.0 < model.select_ratio <= 1.0:
    raise ValueError(
      f'config.model.select_ratio (alpha) must be in (0, 1], got {model.select_ratio}'
    )
  return CAL(
    num_classes=num_classes,
    depth=model.depth,
    width=model.width,
    last_stride=model.last_stride,
    modality_specific_stem=model.modality_specific_stem,
    num_parts=model.num_parts,
    select_ratio=model.select_ratio,
    pool_sizes=tuple(model.pool_sizes),
    shared_region_mining=model.shared_region_mining,
    adapter_hidden=model.adapter_hidden,
    adapter_dim=model.adapter_dim,
    channel_reduction=model.channel_reduction,
    part_queries=model.part_queries,
    attention_similarity=model.attention_similarity,
    channel_attention=model.channel_attention,
    attention_border=model.attention_border,
    attention_centring=model.attention_centring,
    id_classifier=model.id_classifier,
    class_centers=class_centers,
    camera_centers=num_cameras,
    dtype=compute_dtype(model.dtype),
    remat=tuple(model.remat),
    remat_nested=model.remat_nested,
    kd2_attention_gradient=kd2_attention_gradient,
    axis_name=axis_name,
  )
