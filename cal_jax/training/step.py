"""One CAL training step, written against the named axis 'batch'.

`train_step` is a pure function (state, batch, rng) -> (state, metrics): it
splits the device's batch into its visible and infrared halves, draws each
sample's partner of the other modality and the same identity (Eq. 11),
evaluates the objective of Eq. (20), and averages gradients over devices.
Batch norm is synchronised over the axis and batch-coupled losses see the
global batch, so N devices give the update of one device on the whole batch.

`make_p_train_step` returns it pmapped over the local devices.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from cal_jax.losses import LOSS_TERMS, match_distill
from cal_jax.losses.objective import cal_objective
from cal_jax.models.attention_adapter import attention_statistics
from cal_jax.runtime.distributed import AXIS
from cal_jax.training.state import TrainState

ATTENTION_STATISTICS = ('attention_max', 'attention_entropy', 'attention_distinct')
# The scalar metrics of every step ('loss' is the weighted total of Eq. 20).
SCALARS = ('loss',) + LOSS_TERMS + ATTENTION_STATISTICS + ('grad_norm',)


def choose_partners(
  rng: jax.Array, labels: jax.Array, partner_labels: jax.Array, first_index: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """For each sample, a uniformly drawn sample of the other half with its label.

  The draw of sample n depends on the key folded with its global index
  `first_index + n` and on the order of its candidates only, so the choice is
  the same whether the batch is split over devices or not.

  Args:
    rng: the step's key for this direction.
    labels: [B] labels of the samples that need a partner.
    partner_labels: [B'] labels of the candidates.
    first_index: global index of this device's first sample.
  Returns:
    (partner index [B] into the candidates, bool [B]: a candidate exists).
  """
  same = labels[:, None] == partner_labels[None, :]
  count = jnp.sum(same, axis=1)
  keys = jax.vmap(lambda n: jax.random.fold_in(rng, first_index + n))(jnp.arange(labels.shape[0]))
  draw = jax.vmap(lambda k: jax.random.uniform(k))(keys)
  pick = jnp.minimum(jnp.floor(draw * count).astype(jnp.int32), jnp.maximum(count - 1, 0))
  rank = jnp.cumsum(same, axis=1) - 1
  partner = jnp.argmax(same & (rank == pick[:, None]), axis=1).astype(jnp.int32)
  return partner, count > 0


def split_modalities(batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
  """Visible and infrared halves, each in batch order.

  The sampler puts K visible and K infrared images of each identity on a
  device, so each half holds exactly half of the batch.
  Returns (images_v, labels_v, images_i, labels_i, halves_ok, cameras): cameras
  is (cameras_v, cameras_i) where the batch holds 'camera' (Table 4's ICA&CCA), else None.
  """
  modality = batch['modality']
  order = jnp.argsort(modality, stable=True)
  half = modality.shape[0] // 2
  vis, ir = order[:half], order[half:]
  halves_ok = jnp.all(modality[vis] == 0) & jnp.all(modality[ir] == 1)
  cameras = (batch['camera'][vis], batch['camera'][ir]) if 'camera' in batch else None
  return (
    batch['image'][vis],
    batch['label'][vis],
    batch['image'][ir],
    batch['label'][ir],
    halves_ok,
    cameras,
  )


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  *,
  loss_weights: ml_collections.ConfigDict,
  num_parts: int,
  axis_name: str | None = AXIS,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the CAL objective.

  Args:
    state: replicated train state (under pmap: this device's copy).
    batch: 'image' [B, H, W, 3] float32, 'label' [B] int32, 'modality' [B]
      int32 (0 visible, 1 infrared); B/2 of each modality.
    rng: the run's key, the same on every device; folded with the step here.
    loss_weights: `config.loss`.
    num_parts: N_p (for the assignment histogram).
    axis_name: the mapped axis, or None when not mapped.
  Returns:
    (new state, metrics): each loss term, the attention statistics of the
    self-refined maps (`attention_statistics`), the learning-rate-free gradient
    norm, 'assignment_counts' [N_p!] (how often each infrared->visible part
    permutation was the optimum of Eq. 17 in this step, summed over devices),
    and 'bad_pairs' (samples without a same-identity partner; must be 0).
  """
  images_v, labels_v, images_i, labels_i, halves_ok, cameras = split_modalities(batch)
  half = labels_v.shape[0]
  device = jax.lax.axis_index(axis_name) if axis_name is not None else 0
  step_rng = jax.random.fold_in(rng, state.step)
  rng_v, rng_i = jax.random.split(step_rng)
  partner_of_infrared, ok_i = choose_partners(rng_i, labels_i, labels_v, device * half)
  partner_of_visible, ok_v = choose_partners(rng_v, labels_v, labels_i, device * half)

  def loss_fn(params):
    outputs, mutated = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images_v,
      images_i,
      partner_of_infrared,
      partner_of_visible,
      train=True,
      mutable=['batch_stats'],
    )
    total, terms, ir_to_vis = cal_objective(
      outputs,
      labels_v,
      labels_i,
      partner_of_infrared,
      partner_of_visible,
      loss_weights,
      axis_name,
      cameras=cameras,
    )
    # The self-refined maps, the inference path: a collapse shows here first.
    attention = attention_statistics(jnp.concatenate([outputs['sim_vv'], outputs['sim_ii']]))
    return total, (terms | jax.lax.stop_gradient(attention), ir_to_vis, mutated['batch_stats'])

  (_, (terms, ir_to_vis, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  counts = jnp.bincount(match_distill.permutation_rank(ir_to_vis), length=math.factorial(num_parts))
  bad_pairs = jnp.sum(~ok_i) + jnp.sum(~ok_v) + jnp.where(halves_ok, 0, 2 * half)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    terms = jax.lax.pmean(terms, axis_name)
    batch_stats = jax.lax.pmean(batch_stats, axis_name)
    counts = jax.lax.psum(counts, axis_name)
    bad_pairs = jax.lax.psum(bad_pairs, axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = dict(terms)
  metrics['grad_norm'] = jnp.sqrt(
    sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads))
  )
  metrics['assignment_counts'] = counts
  metrics['bad_pairs'] = bad_pairs
  return new_state, metrics


def make_p_train_step(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
):
  """`train_step` pmapped over `devices` (default: the local ones) on axis 'batch'.

  Call it with a replicated state, a batch of [devices, B, ...] arrays and a
  replicated key [devices, 2]; the state is donated.
  """
  step = functools.partial(
    train_step, loss_weights=config.loss, num_parts=config.model.num_parts, axis_name=AXIS
  )
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,), devices=devices)
