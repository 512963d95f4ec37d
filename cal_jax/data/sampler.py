"""Cross-modal identity sampler of the AGW/CAJ code family, as pure numpy.

The reference is ``IdentitySampler`` of AGW
(mangye16/Cross-Modal-Re-ID-baseline, ``utils.py``), which CAJ and most VI-ReID
code reuse. Per epoch it draws ``int(N / (P * K)) + 1`` batches,
``N = max(#visible, #infrared)`` training images; each batch takes P
identities (``np.random.choice(..., replace=False)``, so distinct within the
batch, drawn afresh for every batch) and, per identity, K visible and K
infrared images with ``np.random.choice(pos, K)`` (with replacement, whatever
the identity's image count). The training loop then
concatenates the visible and the infrared halves.

Two identity/image policies:

* ``balanced=False`` (default, AGW): as above.
* ``balanced=True``: identities are consumed from shuffled passes over all
  training identities (no identity repeats within a pass of
  ``num_identities // P`` batches; the few left over are dropped from that
  pass), and an identity's K images are drawn without replacement unless it
  has fewer than K in that modality.

Determinism: the plan of an epoch is a pure function of (seed, epoch), so
``batch_indices(step)`` gives the same batch for the same seed and step
without replaying earlier steps, and a resumed run draws the same batches.

Layout: the global batch is cut into ``num_hosts * local_devices`` shards of
whole identities. Shard ``s`` holds identities ``s*q .. s*q+q-1`` of the batch
(``q = P / num_shards``) as ``[K visible of id a, K visible of id b, ...,
K infrared of id a, K infrared of id b, ...]``. A host produces only its own
shards ``host_index * local_devices ... + local_devices - 1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from cal_jax.data.modality import INFRARED, VISIBLE


@dataclasses.dataclass(frozen=True)
class ShardedBatch:
  """One host's part of a global batch, all arrays [local_devices, 2*q*K].

  Attributes:
    index: example indices into the training split.
    label: identity labels re-mapped to 0..num_classes-1.
    modality: 0 visible, 1 infrared.
    position: position of each image in the global batch, 0..2*P*K-1.
  """

  index: np.ndarray
  label: np.ndarray
  modality: np.ndarray
  position: np.ndarray


@dataclasses.dataclass(frozen=True)
class _EpochPlan:
  identities: np.ndarray  # [steps, P] labels
  visible: np.ndarray  # [steps, P, K] example indices
  infrared: np.ndarray  # [steps, P, K] example indices


class _ModalityIndex:
  """Example indices of one modality grouped by label."""

  def __init__(self, labels: np.ndarray, example_ids: np.ndarray, num_classes: int):
    order = np.argsort(labels, kind='stable')
    self.examples = example_ids[order]
    self.count = np.bincount(labels, minlength=num_classes)
    self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]])

  def draw(
    self, rng: np.random.Generator, chosen: np.ndarray, k: int, without_replacement: bool
  ) -> np.ndarray:
    """Draws k example indices per chosen label: [*chosen.shape, k]."""
    count = self.count[chosen][..., None]
    offset = rng.integers(0, count, size=chosen.shape + (k,))
    if without_replacement:
      # Random keys, padded past each identity's count, sorted: the first k
      # positions are a uniform draw without replacement.
      keys = rng.random(chosen.shape + (int(self.count.max()),))
      keys[np.arange(keys.shape[-1]) >= count] = np.inf
      distinct = np.argsort(keys, axis=-1)[..., :k]
      offset = np.where(count >= k, distinct, offset)
    return self.examples[self.start[chosen][..., None] + offset]


class CrossModalIdentitySampler:
  """P identities x (K visible + K infrared) images per global batch.

  Attributes:
    identities: [num_classes] sorted data-set identity numbers; label i is
      identity ``identities[i]``.
    labels: [num_examples] label of every training example.
    num_classes: number of training identities.
    steps_per_epoch: batches per epoch.
    per_device_batch: images per shard, ``2 * K * P / num_shards``.
  """

  def __init__(
    self,
    ids: Sequence[int] | np.ndarray,
    modality: Sequence[int] | np.ndarray,
    *,
    num_ids_per_batch: int,
    num_pos: int,
    seed: int,
    local_devices: int = 1,
    num_hosts: int = 1,
    host_index: int = 0,
    steps_per_epoch: int = 0,
    balanced: bool = False,
  ):
    """Builds the sampler.

    Args:
      ids: [num_examples] data-set identity number of every training example.
      modality: [num_examples] 0 visible, 1 infrared.
      num_ids_per_batch: P, identities per global batch
        (config.data.num_ids_per_batch).
      num_pos: K, images per identity and modality (config.data.num_pos).
      seed: the run's seed.
      local_devices: devices of this host.
      num_hosts: hosts of the run.
      host_index: this host, 0..num_hosts-1.
      steps_per_epoch: batches per epoch; 0 for AGW's
        ``max(#visible, #infrared) // (P * K) + 1``.
      balanced: the ``balanced=True`` policy of the module docstring.

    Raises:
      ValueError: on inconsistent sizes, an identity lacking a modality, or a
        batch that cannot be cut into whole-identity shards.
    """
    ids = np.asarray(ids).astype(np.int64)
    modality = np.asarray(modality).astype(np.int64)
    if ids.ndim != 1 or ids.shape != modality.shape or not ids.size:
      raise ValueError(
        f'ids {ids.shape} and modality {modality.shape} must be equal, non-empty vectors'
      )
    if not np.isin(modality, (VISIBLE, INFRARED)).all():
      raise ValueError(
        f'modality must be 0 (visible) or 1 (infrared), got values '
        f'{sorted(set(np.unique(modality).tolist()) - {0, 1})}'
      )
    num_shards = num_hosts * local_devices
    if num_ids_per_batch % num_shards:
      raise ValueError(
        f'config.data.num_ids_per_batch={num_ids_per_batch} must be '
        f'divisible by num_hosts * local_devices = {num_hosts} * '
        f'{local_devices} = {num_shards}: every device holds whole '
        'identities'
      )
    if not 0 <= host_index < num_hosts:
      raise ValueError(f'host_index={host_index} not in [0, {num_hosts})')
    if num_pos < 1:
      raise ValueError(f'config.data.num_pos={num_pos} must be positive')

    self.identities, self.labels = np.unique(ids, return_inverse=True)
    self.num_classes = len(self.identities)
    examples = np.arange(len(ids))
    self._by_modality = []
    for m, name in ((VISIBLE, 'visible'), (INFRARED, 'infrared')):
      in_m = modality == m
      index = _ModalityIndex(self.labels[in_m], examples[in_m], self.num_classes)
      missing = self.identities[index.count == 0]
      if missing.size:
        raise ValueError(
          f'{missing.size} training identities have no {name} image, so no '
          f'cross-modal batch can hold them: {missing.tolist()}. Every '
          'training identity needs images of both modalities: restore the '
          f'missing {name} images, or remove these identities from the '
          "data set's training list"
        )
      self._by_modality.append(index)
    if num_ids_per_batch > self.num_classes:
      raise ValueError(
        f'config.data.num_ids_per_batch={num_ids_per_batch} exceeds the '
        f'{self.num_classes} training identities'
      )

    self.num_ids_per_batch = num_ids_per_batch
    self.num_pos = num_pos
    self.seed = int(seed)
    self.local_devices = local_devices
    self.num_hosts = num_hosts
    self.host_index = host_index
    self.num_shards = num_shards
    self.ids_per_shard = num_ids_per_batch // num_shards
    self.per_device_batch = 2 * num_pos * self.ids_per_shard
    self.balanced = balanced
    largest = max(int((modality == m).sum()) for m in (VISIBLE, INFRARED))
    self.steps_per_epoch = steps_per_epoch or largest // (num_ids_per_batch * num_pos) + 1
    self._cache: tuple[int, _EpochPlan] | None = None

  @classmethod
  def from_config(
    cls,
    config: Any,
    ids: Sequence[int] | np.ndarray,
    modality: Sequence[int] | np.ndarray,
    *,
    local_devices: int,
    num_hosts: int = 1,
    host_index: int = 0,
  ) -> CrossModalIdentitySampler:
    """Reads config.seed, config.data.{num_ids_per_batch, num_pos,
    balanced_sampler (default False)} and config.optim.steps_per_epoch."""
    return cls(
      ids,
      modality,
      num_ids_per_batch=int(config.data.num_ids_per_batch),
      num_pos=int(config.data.num_pos),
      seed=int(config.seed),
      local_devices=local_devices,
      num_hosts=num_hosts,
      host_index=host_index,
      steps_per_epoch=int(config.optim.steps_per_epoch),
      balanced=bool(config.data.balanced_sampler),
    )

  def _plan(self, epoch: int) -> _EpochPlan:
    """The batches of one epoch; a pure function of (seed, epoch)."""
    if self._cache is not None and self._cache[0] == epoch:
      return self._cache[1]
    rng = np.random.default_rng([self.seed % 2**63, epoch])
    steps, p, n = self.steps_per_epoch, self.num_ids_per_batch, self.num_classes
    if self.balanced:
      per_pass = n // p
      passes = -(-steps // per_pass)
      order = rng.permuted(np.tile(np.arange(n), (passes, 1)), axis=1)
      chosen = order[:, : per_pass * p].reshape(-1, p)[:steps]
    else:
      chosen = np.argsort(rng.random((steps, n)), axis=1)[:, :p]
    visible, infrared = (
      index.draw(rng, chosen, self.num_pos, self.balanced) for index in self._by_modality
    )
    plan = _EpochPlan(chosen, visible, infrared)
    self._cache = (epoch, plan)
    return plan

  def global_batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole global batch of a step, as every host computes it.

    Args:
      step: global training step, 0-based.

    Returns:
      labels [P], visible example indices [P, K], infrared ones [P, K].
    """
    if step < 0:
      raise ValueError(f'step={step} must be non-negative')
    epoch, i = divmod(int(step), self.steps_per_epoch)
    plan = self._plan(epoch)
    return plan.identities[i], plan.visible[i], plan.infrared[i]

  def batch_indices(self, step: int) -> ShardedBatch:
    """This host's shards of the global batch of a step.

    Args:
      step: global training step, 0-based.

    Returns:
      The host's shards, arrays [local_devices, per_device_batch].
    """
    labels, visible, infrared = self.global_batch(step)
    q, k = self.ids_per_shard, self.num_pos
    first = self.host_index * self.local_devices
    shards = np.arange(first, first + self.local_devices)
    ids_of_shard = shards[:, None] * q + np.arange(q)  # [L, q]
    index = np.concatenate(
      [
        visible[ids_of_shard].reshape(len(shards), q * k),
        infrared[ids_of_shard].reshape(len(shards), q * k),
      ],
      axis=1,
    )
    label = np.repeat(labels[ids_of_shard], k, axis=1)
    modality = np.repeat(np.array([[VISIBLE, INFRARED]]), q * k, axis=1)
    position = shards[:, None] * self.per_device_batch + np.arange(self.per_device_batch)
    return ShardedBatch(
      index=index.astype(np.int64),
      label=np.tile(label, (1, 2)).astype(np.int32),
      modality=np.broadcast_to(modality, index.shape).astype(np.int32),
      position=position.astype(np.int64),
    )
