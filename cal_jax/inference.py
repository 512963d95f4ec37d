"""Test-time CAL (Sec. 3.4): prototype reordering by M-hat and part-cosine similarity.

During training every step reports how often each infrared-part ->
visible-part permutation was the optimal matching of Eq. (17); the most
frequent one of the last epoch, M-hat, reorders the visible DRM's prototypes
(the point-wise convolution's output channels) so that part p of a visible
image and part p of an infrared image describe the same region. The
similarity of a visible and an infrared image is then
sum_p cos(f^{V,V}_p, f^{I,I}_p), a dot product of the embeddings of `CAL.embed`.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cal_jax.losses.match_distill import permutation_from_rank
from cal_jax.models.cal import CAL


def most_frequent_assignment(counts: np.ndarray, num_parts: int) -> np.ndarray:
  """M-hat: the permutation (infrared part k -> visible part M[k]) counted most often.

  Args:
    counts: [N_p!] counts indexed by lexicographic permutation rank.
    num_parts: N_p.
  Returns:
    int32 [N_p]; the identity when nothing was counted. Ties go to the lowest rank.
  """
  counts = np.asarray(counts)
  if counts.shape != (np.prod(np.arange(1, num_parts + 1)),):
    raise ValueError(f'assignment counts have shape {counts.shape}, expected ({num_parts}!,) '
                     f'for config.model.num_parts={num_parts}')
  if counts.sum() == 0:
    return np.arange(num_parts, dtype=np.int32)
  return permutation_from_rank(int(np.argmax(counts)), num_parts)


def reorder_prototypes(params: Any, visible_part_for: np.ndarray) -> Any:
  """Reorders the visible DRM prototypes so that visible part k becomes old part M[k].

  Only the prototypes change (the part classifiers of Eq. 4 are not used at
  test time). With a shared DRM the reordering would move the infrared parts
  too, so it is refused.
  """
  params = flax.core.unfreeze(params)
  if 'region_mining_infrared' not in params:
    raise ValueError('the DRM is shared between modalities (config.model.shared_region_mining);'
                     ' its prototypes cannot be reordered for one modality only')
  order = np.asarray(visible_part_for)
  if sorted(order.tolist()) != list(range(len(order))):
    raise ValueError(f'{order.tolist()} is not a permutation of the parts')
  visible = params['region_mining_visible']
  if 'vectors' in visible:  # Table 4's LV: the learned queries are the prototypes
    visible['vectors'] = visible['vectors'][order]
    return params
  prototypes = visible['prototypes']
  prototypes['kernel'] = prototypes['kernel'][..., order]
  prototypes['bias'] = prototypes['bias'][..., order]
  return params


@functools.partial(jax.jit, static_argnames=('model', 'modality', 'kind'))
def embed(model: CAL, variables: Any, images: jax.Array, modality: int,
          kind: str = 'parts') -> jax.Array:
  """Images of one modality [B, H, W, 3] -> embeddings.

  kind 'parts' (CAL, Sec. 3.4): [B, N_p * C], see `CAL.embed`; 'global' (the
  identity-loss baseline): [B, C], see `CAL.embed_global`.
  """
  if kind not in ('parts', 'global'):
    raise ValueError(f"config.model.embedding must be 'parts' or 'global', got {kind!r}")
  method = CAL.embed if kind == 'parts' else CAL.embed_global
  return model.apply(variables, images, modality, method=method)


def part_cosine_similarity(visible: jax.Array, infrared: jax.Array) -> jax.Array:
  """sum_p cos(f_v,p, f_i,p) for all pairs: [Nv, N_p*C] x [Ni, N_p*C] -> [Nv, Ni]."""
  return jnp.matmul(visible, infrared.T)


@functools.partial(jax.jit, static_argnames=('model', 'modality'))
def part_maps(model: CAL, variables: Any, images: jax.Array, modality: int
              ) -> dict[str, jax.Array]:
  """Images of one modality [B, H, W, 3] -> DRM's S_hat and TSAA's S as
  [B, N_p, h, w] maps ('selected', 'attention'), see `CAL.part_maps`."""
  return model.apply(variables, images, modality, method=CAL.part_maps)
