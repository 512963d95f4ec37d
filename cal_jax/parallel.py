"""Placing pytrees on the local devices for the pmapped steps.

Arrays are laid out with a leading axis of local devices and sharded over a
mesh whose axis is named like the step's ('batch'), which is what a pmapped
step returns: inputs replicated this way hit the same compiled executable as
the step's own outputs (flax's `jax_utils.replicate` names its mesh
differently and costs a second compilation).
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = 'batch'


def local_sharding(devices: Optional[Sequence[jax.Device]] = None) -> NamedSharding:
  mesh = Mesh(np.array(devices or jax.local_devices()), (AXIS,))
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree: Any, devices: Optional[Sequence[jax.Device]] = None) -> Any:
  """One copy of every leaf per device (default: the local ones): [...] -> [devices, ...]."""
  devices = devices or jax.local_devices()
  stacked = jax.tree_util.tree_map(
      lambda x: np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), tree)
  return jax.device_put(stacked, local_sharding(devices))


def unreplicate(tree: Any) -> Any:
  """The first device's copy of every leaf, on the host."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), tree)
