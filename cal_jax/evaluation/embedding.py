"""Test-time CAL (Sec. 3.4): prototype reordering by M-hat, embedding, part-cosine similarity.

M-hat, the part matching counted most often in training
(`cal_jax.training.assignments`), reorders the visible DRM's prototypes
(the point-wise convolution's output channels) so that part p of a visible
image and part p of an infrared image describe the same region. The
similarity of a visible and an infrared image is then
sum_p cos(f^{V,V}_p, f^{I,I}_p), a dot product of the embeddings of `CAL.embed`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cal_jax.data.modality import NAMES as MODALITY_NAMES
from cal_jax.models.cal import CAL
from cal_jax.models.normalize import L2_EPSILON

if TYPE_CHECKING:  # the data layer imports TensorFlow; embedding a batch needs none
  from cal_jax.data.splits import SplitArrays

# Images [B, H, W, 3] (or [L, B / L, H, W, 3] with local devices), modality
# -> features [B, D] (or [L, B / L, D]).
EmbedFn = Callable[[np.ndarray, int], Any]


def reorder_prototypes(params: Any, visible_part_for: np.ndarray) -> Any:
  """Reorders the visible DRM prototypes so that visible part k becomes old part M[k].

  Only the prototypes change (the part classifiers of Eq. 4 are not used at
  test time). With a shared DRM the reordering would move the infrared parts
  too, so it is refused.
  """
  params = flax.core.unfreeze(params)
  if 'region_mining_infrared' not in params:
    raise ValueError(
      'the DRM is shared between modalities (config.model.shared_region_mining);'
      ' its prototypes cannot be reordered for one modality only'
    )
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
def embed(
  model: CAL, variables: Any, images: jax.Array, modality: int, kind: str = 'parts'
) -> jax.Array:
  """Images of one modality [B, H, W, 3] -> embeddings.

  kind 'parts' (CAL, Sec. 3.4): [B, N_p * C], see `CAL.embed`; 'global' (the
  identity-loss baseline): [B, C], see `CAL.embed_global`.
  """
  if kind not in ('parts', 'global'):
    raise ValueError(f"config.model.embedding must be 'parts' or 'global', got {kind!r}")
  method = CAL.embed if kind == 'parts' else CAL.embed_global
  return model.apply(variables, images, modality, method=method)


@functools.partial(jax.pmap, static_broadcasted_argnums=(0, 3, 4), axis_name='batch')
def p_embed(
  model: CAL, variables: Any, images: jax.Array, modality: int, kind: str = 'parts'
) -> jax.Array:
  """`embed` on every local device: replicated variables, images [L, B / L, H, W, 3]."""
  return embed.__wrapped__(model, variables, images, modality, kind)


def part_cosine_similarity(visible: jax.Array, infrared: jax.Array) -> jax.Array:
  """sum_p cos(f_v,p, f_i,p) for all pairs: [Nv, N_p*C] x [Ni, N_p*C] -> [Nv, Ni]."""
  return jnp.matmul(visible, infrared.T)


@functools.partial(jax.jit, static_argnames=('model', 'modality'))
def part_maps(model: CAL, variables: Any, images: jax.Array, modality: int) -> dict[str, jax.Array]:
  """Images of one modality [B, H, W, 3] -> DRM's S_hat and TSAA's S as
  [B, N_p, h, w] maps ('selected', 'attention'), see `CAL.part_maps`."""
  return model.apply(variables, images, modality, method=CAL.part_maps)


def normalize_parts(features: np.ndarray, num_parts: int) -> np.ndarray:
  """Gives each of the num_parts chunks of a feature unit L2 norm.

  Args:
    features: [N, D], D = num_parts * C.
    num_parts: N_p.

  Returns:
    float32 [N, D]; an all-zero chunk stays zero.
  """
  n, dim = features.shape
  if dim % num_parts:
    raise ValueError(
      f'feature width {dim} is not a multiple of num_parts={num_parts} (config.model.num_parts)'
    )
  parts = np.asarray(features, np.float32).reshape(n, num_parts, -1)
  squared = np.maximum(np.sum(np.square(parts), axis=-1, keepdims=True), L2_EPSILON)
  return (parts / np.sqrt(squared)).reshape(n, dim)


def extract_features(
  embed_fn: EmbedFn,
  split: SplitArrays,
  indices: Sequence[int] | np.ndarray,
  *,
  modality: int,
  image_size: tuple[int, int],
  batch_size: int,
  flip: bool,
  num_parts: int,
  local_devices: int | None = None,
  on_batch: Callable[[int, int], Any] | None = None,
) -> np.ndarray:
  """Embeds the given images of one modality.

  Args:
    embed_fn: ``embed_fn(images, modality)``; images are float32 ImageNet-
      normalised [B, H, W, 3] (B = batch_size; the last batch is padded by
      repeating the first image), or [L, B / L, H, W, 3] when
      ``local_devices`` = L is given (a pmapped function); returns [B, D]
      (or [L, B / L, D]) features, D = num_parts * C.
    split: the test split.
    indices: [N] example indices into ``split``, all of ``modality``.
    modality: 0 visible, 1 infrared; passed on to ``embed_fn``.
    image_size: (height, width) of the network input.
    batch_size: images per call (config.data.eval_batch_size).
    flip: average the features of each image and of its mirror image
      (config.data.eval_flip).
    num_parts: N_p; each of the N_p chunks of a feature is re-normalised.
    local_devices: see ``embed_fn``.
    on_batch: called with (images done, N) after each batch (a progress line).

  Returns:
    float32 [N, D], row i the feature of ``split`` example ``indices[i]``,
    each part of unit L2 norm.
  """
  indices = np.asarray(indices, np.int64).ravel()
  if indices.size:
    found = np.unique(split.modality[indices])
    if found.tolist() != [modality]:
      names = [MODALITY_NAMES.get(int(m), str(m)) for m in found]
      raise ValueError(
        f'extract_features embeds images of one modality per call: asked '
        f'for {MODALITY_NAMES.get(modality, modality)} ({modality}), the '
        f'indices hold {names}'
      )
  from cal_jax.data.eval_batches import create_eval_dataset  # TensorFlow: here only

  dataset = create_eval_dataset(
    split,
    indices,
    image_size=image_size,
    batch_size=batch_size,
    flip=flip,
    local_devices=local_devices,
  )
  chunks, order, pending = [], [], []

  def collect(outputs: tuple[Any, Any], batch: dict[str, np.ndarray]) -> None:
    out = _as_features(outputs[0], batch['image'], batch_size)
    if flip:
      out = 0.5 * (out + _as_features(outputs[1], batch['image'], batch_size))
    mask = batch['mask'].reshape(-1)
    chunks.append(out[mask])
    order.append(batch['index'].reshape(-1)[mask])
    if on_batch is not None:
      on_batch(sum(len(o) for o in order), len(indices))

  # One batch in flight: a JAX embedding returns before its result is ready, so the
  # next batch is dispatched (and the input pipeline's next one prepared) before the
  # previous result is read back.
  for batch in dataset.as_numpy_iterator():
    flipped = embed_fn(batch['image_flipped'], modality) if flip else None
    pending.append(((embed_fn(batch['image'], modality), flipped), batch))
    if len(pending) > 1:
      collect(*pending.pop(0))
  while pending:
    collect(*pending.pop(0))
  if not np.array_equal(np.concatenate(order), indices):
    raise RuntimeError('the evaluation batches did not return the images in the order asked')
  return normalize_parts(np.concatenate(chunks), num_parts)


def _as_features(out: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
  """One output of embed_fn for `images`, as float32 [batch_size, D]."""
  out = np.asarray(out, np.float32)
  if out.ndim != images.ndim - 2 or out.shape[:-1] != images.shape[:-3]:
    raise ValueError(
      f'embed_fn returned shape {out.shape} for images of '
      f'shape {images.shape}; expected {images.shape[:-3]} '
      '+ (D,)'
    )
  return out.reshape(batch_size, -1)
