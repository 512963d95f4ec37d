"""Devices and processes: the pmap axis, replicated pytrees, and multi-host runs.

Arrays of the pmapped steps are laid out with a leading axis of local devices
and sharded over a mesh whose axis is named like the step's (`AXIS`, 'batch'),
which is what a pmapped step returns: inputs replicated this way (`replicate`)
hit the same compiled executable as the step's own outputs (flax's
`jax_utils.replicate` names its mesh differently and costs a second compilation).

Every process runs the same program (`python -m cal_jax.main ...`, see `launch/`).
`initialize` calls `jax.distributed.initialize` when the run is multi-process:
explicit coordinator flags, or an environment that JAX configures by itself (a
SLURM step of several tasks, a Cloud TPU VM or GKE TPU slice). A plain run on
one machine never calls it. Afterwards `jax.pmap` maps the train step over the
local devices while its collectives on axis 'batch' (gradients, batch-norm
statistics, PCL centroids) span every device of every process.

What crosses processes outside the train step:
  * `primary_first`: process 0 prepares the data set, the others read it after.
  * `split_and_gather`: each process embeds its slice of the test images and
    the features are gathered in order (evaluation).
Orbax synchronises checkpoint saves itself (`cal_jax.training.checkpointing`).
"""

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = 'batch'  # the mapped axis of the train step and of every collective in it
MODES = ('auto', 'always', 'never')
LOOPBACK_HOSTS = ('127.0.0.1', 'localhost', '[::1]', '::1')
# What `jax.distributed.initialize` reads on a SLURM step (jax._src.clusters.slurm_cluster).
SLURM_VARIABLES = (
  'SLURM_JOB_ID',
  'SLURM_STEP_NODELIST',
  'SLURM_NTASKS',
  'SLURM_PROCID',
  'SLURM_LOCALID',
)
T = TypeVar('T')


@dataclasses.dataclass(frozen=True)
class Options:
  """How to start the multi-controller runtime (the flags of `cal_jax.main`).

  Attributes:
    mode: 'auto': initialise when `coordinator_address` is given or
      `detect_cluster` finds a cluster; 'always'; 'never'.
    coordinator_address: host:port of process 0's coordinator; None lets JAX
      detect it (SLURM, Cloud TPU).
    num_processes: processes of the run; None: detected.
    process_id: this process, 0..num_processes-1; None: detected.
    local_device_ids: devices this process drives; None: JAX's default.
    initialization_timeout: seconds to wait for every process to connect.
  """

  mode: str = 'auto'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  initialization_timeout: int = 300

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'distributed mode {self.mode!r}: choose one of {MODES}')
    if (self.num_processes is None) != (self.process_id is None):
      raise ValueError('--num_processes and --process_id go together: give both or neither')
    if self.num_processes is not None and not 0 <= self.process_id < self.num_processes:
      raise ValueError(
        f'--process_id={self.process_id} must lie in [0, --num_processes={self.num_processes})'
      )
    if self.num_processes is not None and self.coordinator_address is None:
      raise ValueError(
        '--num_processes and --process_id need --coordinator_address (host:port of process 0)'
      )


def on_cloud_tpu_vm() -> bool:
  """libtpu installed and TPU chips attached (the check JAX's own TPU set-up makes)."""
  chips = glob.glob('/dev/accel[0-9]*') + glob.glob('/dev/vfio/[0-9]*')
  return bool(chips) and importlib.util.find_spec('libtpu') is not None


def detect_cluster(environ: Mapping[str, str], tpu_vm: bool) -> str | None:
  """The multi-process environment JAX can configure itself, or None.

  Args:
    environ: the process environment.
    tpu_vm: `on_cloud_tpu_vm()`.
  Returns:
    'slurm' for a SLURM step (`srun`) of more than one task, 'tpu' on a Cloud
    TPU VM or a GKE / multislice TPU job, None otherwise (one process).
  """
  if all(v in environ for v in SLURM_VARIABLES) and int(environ['SLURM_NTASKS']) > 1:
    return 'slurm'
  tpu_variables = ('TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES', 'MEGASCALE_COORDINATOR_ADDRESS')
  if tpu_vm or any(environ.get(v) for v in tpu_variables):
    return 'tpu'
  return None


def should_initialize(
  options: Options, environ: Mapping[str, str], tpu_vm: bool
) -> tuple[bool, str]:
  """(whether to call `jax.distributed.initialize`, why), without side effects."""
  if options.mode == 'never':
    return False, '--distributed=never'
  if options.mode == 'always':
    return True, '--distributed=always'
  if options.coordinator_address:
    return True, f'--coordinator_address={options.coordinator_address}'
  cluster = detect_cluster(environ, tpu_vm)
  if cluster:
    return True, f'{cluster} environment detected'
  return False, 'no coordinator given and no SLURM or Cloud TPU environment'


def is_loopback(address: str) -> bool:
  return address.rsplit(':', 1)[0] in LOOPBACK_HOSTS


def initialize(options: Options, environ: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize` if the run is multi-process; True if it did.

  Must run before anything else touches JAX's devices. A loopback coordinator
  binds to loopback only (JAX's default binds every interface).
  """
  environ = os.environ if environ is None else environ
  start, reason = should_initialize(options, environ, on_cloud_tpu_vm())
  logging.info('Multi-host runtime %s: %s.', 'started' if start else 'not started', reason)
  if not start:
    return False
  kwargs = {}
  if options.coordinator_address and is_loopback(options.coordinator_address):
    kwargs['coordinator_bind_address'] = options.coordinator_address
  jax.distributed.initialize(
    coordinator_address=options.coordinator_address,
    num_processes=options.num_processes,
    process_id=options.process_id,
    local_device_ids=list(options.local_device_ids) if options.local_device_ids else None,
    initialization_timeout=options.initialization_timeout,
    **kwargs,
  )
  return True


def primary_first(fn: Callable[[], T], name: str) -> T:
  """`fn()` on process 0, then, after a barrier, on the others.

  For work that creates shared files (generating and preparing a data set):
  on a shared file system the others then find it done; on per-host disks
  each host repeats it, one after process 0, never two writers at once.
  """
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    result = fn()
  multihost_utils.sync_global_devices(f'{name}: process 0 done')
  if jax.process_index() != 0:
    result = fn()
  multihost_utils.sync_global_devices(f'{name}: all done')
  return result


def process_slice(indices: np.ndarray, num_processes: int, process_index: int) -> np.ndarray:
  """This process's share of `indices`: contiguous, ceil(N / P) of them.

  The last shares are padded by repeating the last index, so every process
  has the same number (the gather needs equal shapes) and none is empty.
  Concatenating the shares of processes 0..P-1 and keeping the first N rows
  gives `indices` back.
  """
  indices = np.asarray(indices).ravel()
  if not indices.size:
    raise ValueError('no indices to share between processes')
  per_process = -(-indices.size // num_processes)
  padded = np.concatenate(
    [indices, np.repeat(indices[-1:], per_process * num_processes - indices.size)]
  )
  return padded[process_index * per_process : (process_index + 1) * per_process]


def split_and_gather(
  extract: Callable[[np.ndarray], np.ndarray], indices: Sequence[int]
) -> np.ndarray:
  """`extract(indices)`, the work split over the processes.

  Each process calls `extract` on its `process_slice`; the rows [ceil(N/P), D]
  are gathered from every process and the padding dropped, so every process
  returns the [N, D] rows of `indices` in their order, each item once. Every
  process must call this with the same `indices`.
  """
  indices = np.asarray(indices).ravel()
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return extract(indices)
  rows = np.asarray(extract(process_slice(indices, count, index)))
  gathered = np.asarray(multihost_utils.process_allgather(rows))  # [P, ceil(N/P), D]
  return gathered.reshape((-1,) + rows.shape[1:])[: indices.size]


def host_share_summary(labels: np.ndarray) -> str:
  """One log line: which identities this process feeds to its devices ([L, B] labels)."""
  per_device = [sorted(set(np.asarray(row).tolist())) for row in labels]
  return (
    f'process {jax.process_index()} of {jax.process_count()}, identities per local '
    f'device: {per_device}'
  )


def local_sharding(devices: Sequence[jax.Device] | None = None) -> NamedSharding:
  mesh = Mesh(np.array(devices or jax.local_devices()), (AXIS,))
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
  """One copy of every leaf per device (default: the local ones): [...] -> [devices, ...]."""
  devices = devices or jax.local_devices()
  stacked = jax.tree_util.tree_map(
    lambda x: np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), tree
  )
  return jax.device_put(stacked, local_sharding(devices))


def unreplicate(tree: Any) -> Any:
  """The first device's copy of every leaf, on the host."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), tree)
