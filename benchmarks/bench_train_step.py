"""Step time of the pmapped CAL train step, against ResNet identity-loss steps; the host
round trip of the query matching; the inference embedding. The accelerator benchmark.

Run from the repository root (no install needed: the script puts the root on sys.path):

  python benchmarks/bench_train_step.py                  # ResNet-50, 288x144, batch 64
  python benchmarks/bench_train_step.py --quick          # the accelerator rows, < 8 minutes
  python benchmarks/bench_train_step.py --rows cal:bf16,cal_identity:bf16,embed:bf16
  python benchmarks/bench_train_step.py --config configs/tiny.py --steps 3 --warmup 1
  python benchmarks/bench_train_step.py --config.data.num_ids_per_batch=16 --no-torch

For the config's network, image size and batch (P identities x (K visible + K
infrared) images, whole identities per device, split over the local devices
as the sampler splits them), it times, on the same batch, the rows named
`KIND:DTYPE[:PRECISION]` (see `ROW_KINDS`):

  cal              `train_step.make_p_train_step(config)`: Eq. (20) in full, with
                   CQM's Hungarian matching on the host (`jax.pure_callback`);
  cal_identity     the same step with `loss.query_matching=False`: the identity
                   assignment, no callback. Its difference to `cal` is what the
                   host round trip costs (on a CPU, nearly nothing);
  cal_global_id    the step with every loss weight 0 but `global_id`;
  cal_remat_blocks, cal_remat   the step with every ResNet stage rematerialised
                   (per block; nested, `config.model.remat_nested`);
  resnet           a pmapped step of the backbone alone (one stem), global
                   average pool, BNNeck, bias-free classifier, cross-entropy,
                   SGD with momentum: AGW's baseline without its triplet loss;
  torch            the same network and optimiser in PyTorch: torchvision's
                   `resnet{depth}` with last stride 1 where torchvision is installed
                   and the width is 64, the project's own PyTorch ResNet otherwise;
                   `cudnn.benchmark` and channels-last on a GPU; bf16 is autocast;
  embed            the inference embedding (`evaluation.embedding`, eval-mode batch
                   norm, as the evaluator calls it) of `data.eval_batch_size` images
                   at the config's size (288x144 by default): images/s.

DTYPE is f32 or bf16 (`config.model.dtype` for the JAX rows, autocast for torch).
PRECISION, for f32 rows only, is `highest` (true fp32 products) or `default` (JAX's and
PyTorch's default: TF32 tensor cores on an NVIDIA GPU since Ampere, one bf16 pass on a
TPU, fp32 on a CPU); the table names the arithmetic ('fp32', 'tf32', 'bf16') and the
MFU is taken against that arithmetic's peak.

Each row runs in a process of its own (--in-process: all in this one), so that its peak
memory is its own: on an accelerator the device's peak (`memory_stats` for JAX,
`torch.cuda.max_memory_allocated` for PyTorch), on a CPU the growth of the process's
peak RSS over the row; this process then starts no JAX backend of its own, so it holds
no device beside them. In each, JAX's backend starts before torch is imported (torch's CUDA
libraries must not shadow those of the JAX plugin), and JAX allocates on demand
(`XLA_PYTHON_CLIENT_PREALLOCATE=false`, unless set otherwise) so that the PyTorch rows
find the memory free.

For each row: the first call (for JAX: tracing, XLA compilation and one step; for
torch: one step with its first allocations), then --warmup untimed steps, then
--steps timed steps (each waited for) and images/s at the median. For the CAL rows
with the matching, the time spent in the host Hungarian solver
(`match_distill.solve_assignments_on_host`, wrapped with a timer before the step is
traced) as a share of the step time. Each JAX row gives the FLOPs of one step as XLA's
cost analysis counts them (all devices; for torch the hand count of the convolutions,
`conv_training_flops`), TFLOP/s, the MFU where the device's peak is known (by
`device_kind`, or --peak-tflops), the compiled step's memory (arguments, outputs not
aliased to them, temporaries; `memory_analysis`) and the peak memory. Figures only,
no assertions; other work on the same machine makes them noisy.

--budget-s (--quick: 450 s) bounds the whole run: a row still running when the budget
is spent is stopped, and the rows after it are listed as skipped (--in-process: only
the rows after it). --out FILE also
writes the report to FILE.
"""

import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# Before JAX is imported: allocate on demand, so that the PyTorch rows find the memory free.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Config files import `configs.default`: the repository root must be importable.
_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, _ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cal_jax.data.modality import VISIBLE  # noqa: E402
from cal_jax.evaluation import embedding  # noqa: E402
from cal_jax.losses import match_distill  # noqa: E402
from cal_jax.models import resnet  # noqa: E402
from cal_jax.models.batch_norm import BatchNorm  # noqa: E402
from cal_jax.models.cal import classifier_init, compute_dtype  # noqa: E402
from cal_jax.runtime import distributed as parallel  # noqa: E402
from cal_jax.training.state import TrainState, build_model, create_train_state  # noqa: E402
from cal_jax.training.step import make_p_train_step  # noqa: E402

torch = None  # imported by `import_torch`, once JAX's backend has started

_DEFAULT_CONFIG = os.path.join(_ROOT, 'configs', 'default.py')
_CONFIG = config_flags.DEFINE_config_file(
  'config', _DEFAULT_CONFIG, 'Configuration file.', lock_config=True
)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per row.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after the first call.')
_NUM_CLASSES = flags.DEFINE_integer('num-classes', 395, 'Training identities (SYSU-MM01: 395).')
_ROWS = flags.DEFINE_list(
  'rows', [], 'Rows to time, KIND:DTYPE[:PRECISION] (default: from --dtypes, --remat, --no-torch).'
)
_QUICK = flags.DEFINE_boolean(
  'quick', False, 'The accelerator rows (QUICK_ROWS), 10 steps, a 450 s budget: < 8 min on a GPU.'
)
_PRECISION = flags.DEFINE_enum(
  'precision', 'highest', ['highest', 'default'], 'f32 rows that name no precision.'
)
_NO_TORCH = flags.DEFINE_boolean('no-torch', False, 'Default rows: skip the PyTorch rows.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Default rows: the dtypes.')
_REMAT = flags.DEFINE_boolean('remat', True, 'Default rows: also the CAL step with remat.')
_PEAK = flags.DEFINE_float(
  'peak-tflops', 0.0, "The device's peak dense TFLOP/s for MFU (0: by device_kind, if known)."
)
_BUDGET = flags.DEFINE_float('budget-s', 0.0, 'Stop after this many seconds (0: no limit).')
_IN_PROCESS = flags.DEFINE_boolean(
  'in-process', False, 'All rows in this process (then the peak memory is a high-water mark).'
)
_OUT = flags.DEFINE_string('out', None, 'Also write the report to this file.')
_ROW = flags.DEFINE_string('row', None, 'Internal: time this one row and write --result.')
_RESULT = flags.DEFINE_string('result', None, 'Internal: the JSON file of --row.')

ROW_KINDS = {
  'cal': 'jax CAL',
  'cal_identity': 'jax CAL identity',
  'cal_global_id': 'jax CAL global_id',
  'cal_remat_blocks': 'jax CAL remat blocks',
  'cal_remat': 'jax CAL remat',
  'resnet': 'jax ResNet ID',
  'torch': 'torch ResNet ID',
  'embed': 'jax embed',
}
# --quick, in this order (a row the budget does not reach is skipped): the host round
# trip, the embedding, the bf16 steps against PyTorch's autocast, then true fp32 and TF32.
QUICK_ROWS = (
  'cal:bf16',
  'cal_identity:bf16',
  'embed:f32',
  'embed:bf16',
  'torch:bf16',
  'resnet:bf16',
  'cal:f32:highest',
  'torch:f32:highest',
  'cal:f32:default',
  'torch:f32:default',
)
QUICK_BUDGET_S = 450.0

# Peak dense TFLOP/s per device by `device_kind` substring (the first that matches), per
# arithmetic. A TPU has no fp32 matrix unit ('highest' runs several bf16 passes): no peak.
PEAK_TFLOPS = {
  'H100 PCIe': {'fp32': 51.0, 'tf32': 378.0, 'bf16': 756.0},
  'H100': {'fp32': 67.0, 'tf32': 494.7, 'bf16': 989.4},  # SXM
  'H200': {'fp32': 67.0, 'tf32': 494.7, 'bf16': 989.4},
  'A100': {'fp32': 19.5, 'tf32': 156.0, 'bf16': 312.0},
  'TPU v4': {'bf16': 275.0},
  'TPU v5 lite': {'bf16': 197.0},
  'TPU v5p': {'bf16': 459.0},
  'TPU v6 lite': {'bf16': 918.0},
}


@dataclasses.dataclass
class Timing:
  """Timings of one row, in seconds."""

  name: str
  first_call: float
  steps: list[float]
  images: int
  callback: float | None = None  # host solver time summed over the timed steps
  dtype: str = 'float32'
  arithmetic: str = 'fp32'  # what the matrix products run as: fp32, tf32, bf16
  flops: float | None = None  # per step, all devices, XLA's cost analysis
  compiled_bytes: float | None = None  # per device: arguments + outputs + temporaries
  peak_bytes: float | None = None  # per device, this row's peak (see the module doc)
  note: str = ''
  devices: str = ''  # where it ran: 'N x DEVICE_KIND (platform)'

  @property
  def median(self) -> float:
    return statistics.median(self.steps)

  @property
  def mean(self) -> float:
    return statistics.fmean(self.steps)


@dataclasses.dataclass(frozen=True)
class Row:
  """One row: KIND:DTYPE[:PRECISION]."""

  kind: str
  dtype: str  # float32 | bfloat16
  precision: str  # highest | default (bf16 rows: default)

  @classmethod
  def parse(cls, text: str, precision: str = 'highest') -> 'Row':
    parts = text.strip().split(':')
    if not 1 <= len(parts) <= 3 or parts[0] not in ROW_KINDS:
      raise ValueError(
        f'a row is KIND:DTYPE[:PRECISION], KIND one of {sorted(ROW_KINDS)}: {text!r}'
      )
    dtype = {'f32': 'float32', 'bf16': 'bfloat16'}.get(parts[1] if len(parts) > 1 else 'f32')
    if dtype is None:
      raise ValueError(f'the dtype of a row is f32 or bf16: {text!r}')
    precision = parts[2] if len(parts) > 2 else precision
    if precision not in ('highest', 'default'):
      raise ValueError(f'the precision of a row is highest or default: {text!r}')
    return cls(parts[0], dtype, 'default' if dtype == 'bfloat16' else precision)

  @property
  def id(self) -> str:
    return f'{self.kind}:{short(self.dtype)}' + (
      f':{self.precision}' if self.dtype == 'float32' else ''
    )

  @property
  def name(self) -> str:
    return f'{ROW_KINDS[self.kind]} {short(self.dtype)}'


def default_rows() -> list[str]:
  """The rows of a run without --rows or --quick, from --dtypes, --remat and --no-torch."""
  rows = []
  if not _NO_TORCH.value:
    rows += ['torch:f32', 'torch:bf16']
  for dtype in _DTYPES.value:
    compute_dtype(dtype)  # a clear error for an unknown dtype
    d = short(dtype)
    rows.append(f'cal:{d}')
    if dtype == 'float32':
      rows += ['cal_global_id:f32', 'cal_identity:f32']
    rows.append(f'resnet:{d}')
  if _REMAT.value:
    d = short(_DTYPES.value[0])
    rows += [f'cal_remat_blocks:{d}', f'cal_remat:{d}']
  return rows + [f'embed:{short(dtype)}' for dtype in _DTYPES.value]


def platform_name() -> str:
  """The default backend's platform: cpu, gpu or tpu."""
  return jax.local_devices()[0].platform


def jax_arithmetic(dtype: str, precision: str) -> str:
  """What a JAX row's matrix products run as on this platform."""
  if dtype == 'bfloat16':
    return 'bf16'
  if precision == 'highest' or platform_name() == 'cpu':
    return 'fp32'
  return 'tf32' if platform_name() == 'gpu' else 'bf16'


def import_torch() -> Any:
  """torch, imported after JAX's backend has started (or None when not installed)."""
  global torch
  jax.devices()  # JAX's plugin loads its CUDA libraries first
  if torch is None:
    try:
      import torch as torch_module
    except ImportError:
      return None
    torch = torch_module
  return torch


def identity_batch(
  config: ml_collections.ConfigDict, devices: int, num_classes: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """Random images laid out as the sampler lays them out.

  Per device, whole identities, K visible then K infrared images of each.
  Returns 'image' [devices, B, H, W, 3] float32, 'label' and 'modality'
  [devices, B] int32, with B = 2 K P / devices.
  """
  ids, k = config.data.num_ids_per_batch, config.data.num_pos
  if ids % devices:
    raise ValueError(
      f'config.data.num_ids_per_batch={ids} is not divisible by the {devices} local devices'
    )
  if num_classes < ids:
    raise ValueError(f'--num-classes={num_classes} is smaller than the {ids} identities of a batch')
  rng = np.random.default_rng(seed)
  identities = rng.choice(num_classes, ids, replace=False).reshape(devices, ids // devices)
  labels = np.stack([np.concatenate([np.repeat(d, k)] * 2) for d in identities])
  modality = np.broadcast_to(np.repeat([0, 1], ids // devices * k), labels.shape)
  shape = labels.shape + (config.data.image_height, config.data.image_width, 3)
  return {
    'image': rng.standard_normal(shape, dtype=np.float32),
    'label': labels.astype(np.int32),
    'modality': modality.astype(np.int32),
  }


class CallbackTimer:
  """Calls a host function and records how long each call took."""

  def __init__(self, function: Callable[..., Any]):
    self.function = function
    self.durations: list[float] = []

  def __call__(self, *args, **kwargs):
    start = time.perf_counter()
    try:
      return self.function(*args, **kwargs)
    finally:
      self.durations.append(time.perf_counter() - start)


def time_steps(
  name: str,
  run_step: Callable[[], None],
  warmup: int,
  steps: int,
  images: int,
  on_timed_start: Callable[[], None] = lambda: None,
) -> Timing:
  """First call, `warmup` untimed calls, then `steps` timed calls of `run_step`."""
  start = time.perf_counter()
  run_step()
  first_call = time.perf_counter() - start
  for _ in range(warmup):
    run_step()
  on_timed_start()
  durations = []
  for _ in range(steps):
    start = time.perf_counter()
    run_step()
    durations.append(time.perf_counter() - start)
  print(
    f'  {name}: first call {first_call:.2f} s, steps ' + ' '.join(f'{d:.3f}' for d in durations),
    flush=True,
  )
  return Timing(name, first_call, durations, images)


def compiled_costs(p_step: Callable, *args: Any) -> tuple[float | None, float | None]:
  """(FLOPs of one call over all devices, bytes per device) of a pmapped step, from XLA."""
  try:
    compiled = p_step.lower(*args).compile()
  except Exception as error:  # noqa: BLE001 - a figure missing is not a failure
    print(f'  (no cost analysis: {error})')
    return None, None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) * jax.local_device_count() if cost else None
  memory = compiled.memory_analysis()
  size = None
  if memory is not None:
    # The donated state's outputs reuse its arguments' buffers (the alias): counted once.
    size = float(
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      - memory.alias_size_in_bytes
      + memory.temp_size_in_bytes
    )
  return flops, size


def device_peak_bytes() -> float | None:
  """The first local device's peak allocated bytes, where the backend reports it."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return float(stats['peak_bytes_in_use']) if 'peak_bytes_in_use' in stats else None


def conv_training_flops(config: ml_collections.ConfigDict) -> float:
  """Hand count: 3 x the forward FLOPs (2 per multiply-add) of the backbone's convolutions
  for one step's images. The stem runs at H/2 x W/2, its max-pool halves again; each stage
  as `resnet.Stages` builds it."""
  m, d = config.model, config.data
  kind, blocks_per_stage = resnet.ARCHITECTURES[m.depth]
  h, w = -(-d.image_height // 2), -(-d.image_width // 2)
  macs = h * w * 3 * m.width * 49
  h, w = -(-h // 2), -(-w // 2)
  channels = m.width
  expansion = resnet.block_expansion(m.depth)
  for stage, (num_blocks, stage_stride) in enumerate(
    zip(blocks_per_stage, (1, 2, 2, m.last_stride))
  ):
    features = m.width * 2**stage
    for index in range(num_blocks):
      stride = stage_stride if index == 0 else 1
      ho, wo = -(-h // stride), -(-w // stride)
      if kind == 'bottleneck':
        macs += h * w * channels * features  # 1x1
        macs += ho * wo * features * features * 9  # 3x3, strided
        macs += ho * wo * features * features * 4  # 1x1 up
      else:
        macs += ho * wo * channels * features * 9 + ho * wo * features * features * 9
      if index == 0 and (stride != 1 or channels != features * expansion):
        macs += ho * wo * channels * features * expansion
      h, w, channels = ho, wo, features * expansion
  images = 2 * d.num_ids_per_batch * d.num_pos
  return 3 * 2 * macs * images


def peak_tflops(arithmetic: str, kind: str) -> float | None:
  """The peak of a device of `kind` for `arithmetic` (fp32, tf32, bf16): --peak-tflops,
  else the table by device kind; None where neither knows it."""
  if _PEAK.value > 0:
    return _PEAK.value
  for name, peaks in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return peaks.get(arithmetic)
  return None


def pmapped_runner(p_step: Callable, state: Any, *args: Any) -> Callable[[], None]:
  """One call of a pmapped step that donates its state, waited for."""
  holder = [state]

  def run_step() -> None:
    holder[0], metrics = p_step(holder[0], *args)
    jax.block_until_ready((holder[0], metrics))

  return run_step


def time_cal_step(
  name: str,
  config: ml_collections.ConfigDict,
  batch: dict[str, jax.Array],
  num_classes: int,
  warmup: int,
  steps: int,
) -> Timing:
  """The CAL step of `config`, with the host solver timed."""
  timer = CallbackTimer(match_distill.solve_assignments_on_host)
  # match_queries looks the solver up in its module when the step is traced,
  # so the patch must be in place before the first call.
  match_distill.solve_assignments_on_host = timer
  try:
    model = build_model(config, num_classes, axis_name=parallel.AXIS)
    state = create_train_state(
      model,
      config,
      jax.random.key(config.seed),
      steps_per_epoch=config.optim.steps_per_epoch or 1000,
    )
    key = parallel.replicate(jax.random.key_data(jax.random.key(config.seed)))
    p_step = make_p_train_step(config)
    replicated = parallel.replicate(state)
    flops, size = compiled_costs(p_step, replicated, batch, key)
    timing = time_steps(
      name,
      pmapped_runner(p_step, replicated, batch, key),
      warmup,
      steps,
      batch['label'].size,
      timer.durations.clear,
    )
  finally:
    match_distill.solve_assignments_on_host = timer.function
  # The identity assignment (loss.query_matching=False) makes no callback at all.
  timing.callback = sum(timer.durations) if config.loss.get('query_matching', True) else None
  timing.dtype = config.model.get('dtype', 'float32')
  timing.flops, timing.compiled_bytes = flops, size
  return timing


class ResNetIdentity(nn.Module):
  """Backbone, global average pool, BNNeck, bias-free classifier: [B, H, W, 3] -> [B, K]."""

  num_classes: int
  depth: int = 50
  width: int = 64
  last_stride: int = 1
  axis_name: str | None = None
  dtype: Any = None  # the backbone's, as in `CAL`; the head is float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = True) -> jax.Array:
    maps = resnet.ResNet(
      self.depth, self.width, self.last_stride, self.axis_name, self.dtype, name='backbone'
    )(images, train)
    neck = BatchNorm(use_bias=False, axis_name=self.axis_name, name='neck')(
      jnp.mean(maps.astype(jnp.float32), axis=(1, 2)), not train
    )
    return nn.Dense(
      self.num_classes, use_bias=False, kernel_init=classifier_init, name='classifier'
    )(neck)


def sgd(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """`torch.optim.SGD(lr, momentum, weight_decay, nesterov)` at the base rate."""
  return optax.chain(
    optax.add_decayed_weights(optim.weight_decay),
    optax.sgd(optim.base_lr, optim.momentum, optim.nesterov),
  )


def resnet_identity_step(
  state: TrainState, batch: dict[str, jax.Array], *, axis_name: str = parallel.AXIS
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the cross-entropy of `ResNetIdentity`, gradients averaged over devices."""

  def loss_fn(params):
    logits, mutated = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
    )
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']))
    return loss, mutated['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis_name)
  batch_stats = jax.lax.pmean(batch_stats, axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return new_state, {'loss': jax.lax.pmean(loss, axis_name)}


def time_jax_resnet_step(
  config: ml_collections.ConfigDict,
  batch: dict[str, jax.Array],
  num_classes: int,
  warmup: int,
  steps: int,
) -> Timing:
  """`resnet_identity_step` on the config's backbone, with `sgd` at the base rate."""
  m = config.model
  model = ResNetIdentity(
    num_classes, m.depth, m.width, m.last_stride, parallel.AXIS, compute_dtype(m.dtype)
  )
  images = jnp.zeros((2, config.data.image_height, config.data.image_width, 3), jnp.float32)
  init = jax.jit(functools.partial(model.clone(axis_name=None).init, train=False))
  variables = init(jax.random.key(config.seed), images)
  state = TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=sgd(config.optim),
  )
  p_step = jax.pmap(resnet_identity_step, axis_name=parallel.AXIS, donate_argnums=(0,))
  replicated = parallel.replicate(state)
  flops, size = compiled_costs(p_step, replicated, batch)
  timing = time_steps(
    f'jax ResNet ID {short(m.dtype)}',
    pmapped_runner(p_step, replicated, batch),
    warmup,
    steps,
    batch['label'].size,
  )
  timing.dtype, timing.flops, timing.compiled_bytes = m.dtype, flops, size
  return timing


def torch_resnet_identity(
  depth: int, width: int, last_stride: int, num_classes: int
) -> 'torch.nn.Module':
  """The torchvision ResNet of `cal_jax.interop.torch_model` with `ResNetIdentity`'s head."""
  from cal_jax.interop import torch_model

  tnn = torch.nn
  kind, blocks_per_stage = resnet.ARCHITECTURES[depth]
  block = torch_model.Bottleneck if kind == 'bottleneck' else torch_model.BasicBlock
  layers, channels = [torch_model.Stem(width)], width
  for stage, (num_blocks, stride) in enumerate(zip(blocks_per_stage, (1, 2, 2, last_stride))):
    layers.append(torch_model.make_stage(block, channels, width * 2**stage, num_blocks, stride))
    channels = width * 2**stage * block.expansion
  neck = tnn.BatchNorm1d(channels)
  neck.bias.requires_grad_(False)  # AGW's BNNeck: no shift
  classifier = tnn.Linear(channels, num_classes, bias=False)
  tnn.init.normal_(classifier.weight, std=0.001)
  for module in layers:
    for conv in module.modules():
      if isinstance(conv, tnn.Conv2d):
        tnn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
  return tnn.Sequential(*layers, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), neck, classifier)


def torchvision_resnet_identity(depth: int, last_stride: int, num_classes: int) -> Any:
  """torchvision's `resnet{depth}` (no weights) with last stride `last_stride` and
  `ResNetIdentity`'s head (BNNeck without shift, bias-free classifier)."""
  import torchvision

  tnn = torch.nn
  net = getattr(torchvision.models, f'resnet{depth}')(weights=None)
  if last_stride == 1:
    block = net.layer4[0]
    (block.conv2 if hasattr(block, 'conv3') else block.conv1).stride = (1, 1)
    if block.downsample is not None:
      block.downsample[0].stride = (1, 1)
  channels = net.fc.in_features
  neck = tnn.BatchNorm1d(channels)
  neck.bias.requires_grad_(False)
  classifier = tnn.Linear(channels, num_classes, bias=False)
  tnn.init.normal_(classifier.weight, std=0.001)
  net.fc = tnn.Sequential(neck, classifier)
  return net


def torch_reference(config: ml_collections.ConfigDict, num_classes: int) -> tuple[Any, str]:
  """(model, which): torchvision's ResNet where installed and the width is 64 (torchvision
  has no other), the project's PyTorch ResNet otherwise."""
  m = config.model
  try:
    import torchvision  # noqa: F401
  except ImportError:
    torchvision = None
  if torchvision is not None and m.width == 64:
    return torchvision_resnet_identity(m.depth, m.last_stride, num_classes), 'torchvision'
  return torch_resnet_identity(m.depth, m.width, m.last_stride, num_classes), 'cal_jax.interop'


def time_torch_resnet_step(
  config: ml_collections.ConfigDict,
  batch: dict[str, np.ndarray],
  num_classes: int,
  warmup: int,
  steps: int,
  dtype: str = 'float32',
  precision: str = 'highest',
) -> Timing:
  """The PyTorch reference (`torch_reference`) and `torch.optim.SGD` on the same batch, on
  the GPU where torch has one (`cudnn.benchmark`, channels-last); bfloat16 as autocast;
  float32 products in true fp32 ('highest') or TF32 where the GPU has it ('default')."""
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(config.seed)
  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  tf32 = cuda and dtype == 'float32' and precision == 'default'
  if cuda:
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.cuda.reset_peak_memory_stats()
  optim = config.optim
  model, which = torch_reference(config, num_classes)
  memory_format = torch.channels_last if cuda else torch.contiguous_format
  model = model.train().to(device, memory_format=memory_format)
  optimizer = torch.optim.SGD(
    [p for p in model.parameters() if p.requires_grad],
    lr=optim.base_lr,
    momentum=optim.momentum,
    weight_decay=optim.weight_decay,
    nesterov=optim.nesterov,
  )
  images = torch.from_numpy(batch['image'].reshape((-1,) + batch['image'].shape[2:]))
  images = images.permute(0, 3, 1, 2).contiguous().to(device, memory_format=memory_format)
  labels = torch.from_numpy(batch['label'].reshape(-1).astype(np.int64)).to(device)
  loss_fn = torch.nn.CrossEntropyLoss()
  autocast = (
    functools.partial(torch.autocast, device, dtype=torch.bfloat16)
    if dtype == 'bfloat16'
    else contextlib.nullcontext
  )

  def run_step() -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      loss = loss_fn(model(images), labels)
    loss.backward()
    optimizer.step()
    if cuda:
      torch.cuda.synchronize()

  timing = time_steps(f'torch ResNet ID {short(dtype)}', run_step, warmup, steps, labels.numel())
  timing.dtype = dtype
  timing.arithmetic = 'bf16' if dtype == 'bfloat16' else ('tf32' if tf32 else 'fp32')
  timing.flops = conv_training_flops(config)  # torch counts nothing: the hand count
  timing.note = which + (', autocast' if dtype == 'bfloat16' else '')
  if cuda:
    timing.peak_bytes = float(torch.cuda.max_memory_allocated())
  return timing


def time_embedding(
  config: ml_collections.ConfigDict, num_classes: int, warmup: int, steps: int
) -> Timing:
  """`evaluation.embedding`'s jitted embedding (pmapped on several local devices, as the
  evaluator runs it) of `config.data.eval_batch_size` random visible images."""
  d = config.data
  model = build_model(config, num_classes)
  state = create_train_state(model, config, jax.random.key(config.seed), steps_per_epoch=1000)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  devices = jax.local_device_count()
  size = d.eval_batch_size
  if size % devices:
    raise ValueError(f'config.data.eval_batch_size={size} is not divisible by {devices} devices')
  rng = np.random.default_rng(config.seed)
  shape = (devices, size // devices, d.image_height, d.image_width, 3)
  images = rng.standard_normal(shape, dtype=np.float32)
  kind = config.model.get('embedding', 'parts')
  if devices > 1:
    variables = parallel.replicate(variables)
    images = jax.device_put(images, parallel.local_sharding())
    call = functools.partial(embedding.p_embed, model, variables, images, VISIBLE, kind)
    lowered = lambda: embedding.p_embed.lower(model, variables, images, VISIBLE, kind)
  else:
    images = jax.device_put(images[0])
    call = functools.partial(embedding.embed, model, variables, images, VISIBLE, kind)
    lowered = lambda: embedding.embed.lower(model, variables, images, VISIBLE, kind=kind)
  flops = size_bytes = None
  try:
    compiled = lowered().compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', 0.0)) * (devices if devices > 1 else 1) if cost else None
    memory = compiled.memory_analysis()
    if memory is not None:
      size_bytes = float(
        memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
      )
  except Exception as error:  # noqa: BLE001 - a figure missing is not a failure
    print(f'  (no cost analysis: {error})')
  run = lambda: jax.block_until_ready(call())
  timing = time_steps(f'jax embed {short(config.model.dtype)}', run, warmup, steps, size)
  timing.dtype, timing.flops, timing.compiled_bytes = config.model.dtype, flops, size_bytes
  timing.note = f'{size} images {d.image_height}x{d.image_width}, inference'
  return timing


def peak_rss_bytes() -> int:
  """This process's peak resident set size so far (Linux reports KiB)."""
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def short(dtype: str) -> str:
  return {'float32': 'f32', 'bfloat16': 'bf16'}.get(dtype, dtype)


def with_model(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
  """A copy of `config` with some `config.model` fields replaced."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for name, value in fields.items():
      config.model[name] = value
  return config


def global_id_only(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose objective is the global identity loss alone."""
  config = copy.deepcopy(config)
  for term in ('id', 'pcl', 'kd1', 'kd2', 'dis', 'div'):
    config.loss[term] = 0.0
  config.loss.global_id = 1.0
  return config


def with_loss(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
  """A copy of `config` with some `config.loss` fields replaced."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for name, value in fields.items():
      config.loss[name] = value
  return config


def run_row(
  row: Row,
  config: ml_collections.ConfigDict,
  host_batch: dict[str, np.ndarray],
  num_classes: int,
  warmup: int,
  steps: int,
) -> Timing:
  """Times one row in this process; its peak memory as the module doc describes it."""
  rss_before = peak_rss_bytes()
  if row.kind == 'torch':
    if import_torch() is None:
      raise RuntimeError('torch is not installed')
    timing = time_torch_resnet_step(
      config, host_batch, num_classes, warmup, steps, row.dtype, row.precision
    )
  else:
    variant = with_model(config, dtype=row.dtype)
    if row.kind == 'cal_identity':
      variant = with_loss(variant, query_matching=False)
    elif row.kind == 'cal_global_id':
      variant = global_id_only(variant)
    elif row.kind in ('cal_remat_blocks', 'cal_remat'):
      nested = row.kind == 'cal_remat'
      variant = with_model(variant, remat=(1, 2, 3, 4), remat_nested=nested)
    with jax.default_matmul_precision(row.precision):
      if row.kind == 'embed':
        timing = time_embedding(variant, num_classes, warmup, steps)
      else:
        batch = jax.device_put(host_batch, parallel.local_sharding())
        if row.kind == 'resnet':
          timing = time_jax_resnet_step(variant, batch, num_classes, warmup, steps)
        else:
          timing = time_cal_step(row.name, variant, batch, num_classes, warmup, steps)
    timing.arithmetic = jax_arithmetic(row.dtype, row.precision)
    timing.peak_bytes = device_peak_bytes()
  if timing.peak_bytes is None:  # a CPU: the growth of the peak RSS over this row
    timing.peak_bytes = float(peak_rss_bytes() - rss_before)
  timing.name = row.name
  device = jax.local_devices()[0]
  timing.devices = f'{jax.local_device_count()} x {device.device_kind} ({device.platform})'
  return timing


def run_row_in_subprocess(row: Row, steps: int, warmup: int, timeout: float | None) -> Any:
  """Times one row in a fresh process (the same flags, --row): a Timing, or why not (str)."""
  with tempfile.TemporaryDirectory() as folder:
    result = os.path.join(folder, 'row.json')
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
    command += [f'--row={row.id}', f'--result={result}', f'--steps={steps}', f'--warmup={warmup}']
    try:
      completed = subprocess.run(command, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
      return f'stopped: the budget ran out after {timeout:.0f} s'
    if completed.returncode != 0 or not os.path.exists(result):
      return f'failed (exit status {completed.returncode}; its output is above)'
    with open(result) as f:
      return Timing(**json.load(f))


def versions() -> str:
  """The libraries' versions (without importing torch into this process)."""
  import importlib.metadata as metadata

  found = []
  names = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'scipy', 'torch')
  for name in names + ('torchvision', 'ml_collections', 'absl-py', 'PyYAML'):
    try:
      found.append(f'{name} {metadata.version(name)}')
    except metadata.PackageNotFoundError:
      pass
  plugins = sorted(
    f'{d.metadata["Name"]} {d.version}'
    for d in metadata.distributions()
    if (d.metadata['Name'] or '').lower().replace('_', '-').startswith(('jax-cuda', 'libtpu'))
  )
  return ', '.join(found + plugins)


def format_report(
  config: ml_collections.ConfigDict,
  config_name: str,
  num_classes: int,
  warmup: int,
  steps: int,
  timings: dict[str, Timing],
  missing: dict[str, str],
) -> list[str]:
  """The machine, the config, the batch, one row of figures per row, then the comparisons."""
  d, m = config.data, config.model
  batch = 2 * d.num_ids_per_batch * d.num_pos
  devices = next((t.devices for t in timings.values()), 'unknown: no row finished')
  lines = [
    f'date      {datetime.datetime.now().isoformat(timespec="seconds")}',
    f'machine   processor={platform.processor() or platform.machine()!r}, '
    f'cpu_count={os.cpu_count()}, python {platform.python_version()}',
    f'versions  {versions()}',
    f'devices   {devices}, '
    f'XLA_PYTHON_CLIENT_PREALLOCATE={os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")}',
    f'config    {config_name}: ResNet-{m.depth} width {m.width} last stride '
    f'{m.last_stride}, {d.image_height}x{d.image_width}, N_p={m.num_parts}, '
    f'{num_classes} classes',
    f'batch     {batch} images = {d.num_ids_per_batch} ids x ({d.num_pos} visible + '
    f'{d.num_pos} infrared), over the local devices; {warmup} warm-up + {steps} timed steps'
    f'; embed: {d.eval_batch_size} images',
    '',
    f'{"row":<22}{"arith":>6}{"first call s":>13}{"median s":>10}{"images/s":>10}'
    f'{"host solver":>12}{"GFLOP/step":>12}{"TFLOP/s":>9}{"MFU":>7}{"memory GB":>11}'
    f'{"peak GB":>9}  note',
  ]
  gb = lambda x: f'{x / 2**30:.2f}' if x is not None else 'n/a'
  for row_id, t in timings.items():
    share = '' if t.callback is None else f'{100 * t.callback / sum(t.steps):.3g}%'
    rate = t.flops / t.median / 1e12 if t.flops else None
    peak = peak_tflops(t.arithmetic, t.devices)
    mfu = f'{100 * rate / peak:.1f}%' if rate and peak else 'n/a'
    lines.append(
      f'{t.name:<22}{t.arithmetic:>6}{t.first_call:>13.2f}{t.median:>10.4f}'
      f'{t.images / t.median:>10.1f}{share:>12}{(t.flops or 0) / 1e9:>12.1f}{(rate or 0):>9.3f}'
      f'{mfu:>7}{gb(t.compiled_bytes):>11}{gb(t.peak_bytes):>9}  {row_id}'
      + (f', {t.note}' if t.note else '')
    )
  for row_id, why in missing.items():
    lines.append(f'{ROW_KINDS.get(row_id.split(":")[0], row_id):<22}  {row_id}: {why}')
  hand = conv_training_flops(config)
  lines += [
    '',
    f"hand count: the backbone's convolutions, 3 x forward = {hand / 1e9:.1f} GFLOP per step, "
    f"{hand / batch / 1e9:.2f} GFLOP per image (the torch rows' FLOPs)",
    "arith: what the matrix products run as (MFU against that arithmetic's peak); memory GB: "
    "the compiled JAX step's arguments + outputs (those aliased to the donated arguments once) "
    "+ temporaries per device; peak GB: the row's own peak, on the device where it reports "
    "one, else the growth of its process's peak RSS",
  ]
  for dtype in ('f32', 'bf16'):
    suffix = ':highest' if dtype == 'f32' else ''
    with_cqm = timings.get(f'cal:{dtype}{suffix}') or timings.get(f'cal:{dtype}:default')
    identity = timings.get(f'cal_identity:{dtype}{suffix}') or timings.get(
      f'cal_identity:{dtype}:default'
    )
    if with_cqm and identity and with_cqm.arithmetic == identity.arithmetic:
      extra = with_cqm.median - identity.median
      solver = (with_cqm.callback or 0.0) / len(with_cqm.steps)
      lines.append(
        f'host round trip {dtype} ({with_cqm.arithmetic}): CAL with CQM (jax.pure_callback) '
        f'- CAL with the identity assignment = {extra * 1e3:.2f} ms/step '
        f'({100 * extra / with_cqm.median:.3g}% of the CAL step); the solver itself '
        f'{solver * 1e3:.2f} ms/step'
      )
  for row_id, t in timings.items():
    if row_id.startswith('embed:'):
      lines.append(
        f'embedding {short(t.dtype)} ({t.arithmetic}): {t.images / t.median:.1f} images/s at '
        f'{d.image_height}x{d.image_width}'
      )
  pairs = [(f'cal:{x}', f'resnet:{x}') for x in ('f32:highest', 'f32:default', 'bf16')]
  pairs += [(f'resnet:{x}', f'torch:{x}') for x in ('f32:highest', 'f32:default', 'bf16')]
  pairs += [(f'cal:{x}', f'torch:{x}') for x in ('f32:highest', 'f32:default', 'bf16')]
  pairs += [('cal:bf16', 'cal:f32:highest'), ('cal:f32:default', 'cal:f32:highest')]
  pairs += [('cal_remat:f32:highest', 'cal:f32:highest'), ('torch:bf16', 'torch:f32:highest')]
  for a, b in pairs:
    if a in timings and b in timings:
      lines.append(f'median step ratio  {a} / {b} = {timings[a].median / timings[b].median:.2f}')
  return lines


def main(argv: list[str]) -> None:
  """Times the rows one after another, each in its own process, then prints the report."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  config_name = os.path.relpath(config_flags.get_config_filename(flags.FLAGS['config']))
  num_classes, warmup, steps = _NUM_CLASSES.value, _WARMUP.value, _STEPS.value
  if _QUICK.value:
    steps = steps if flags.FLAGS['steps'].present else 10
    warmup = warmup if flags.FLAGS['warmup'].present else 3
  if steps < 1 or warmup < 0:
    raise app.UsageError('--steps must be >= 1 and --warmup >= 0')
  # Where the rows run in processes of their own, this one does not start JAX's backend: it
  # would hold the device beside them (and one in exclusive-process mode would refuse them).
  batch_of = lambda: identity_batch(config, jax.local_device_count(), num_classes, config.seed)
  if _ROW.value:  # a row of the parent's run, in its own process; JAX's backend starts first
    timing = run_row(Row.parse(_ROW.value), config, batch_of(), num_classes, warmup, steps)
    with open(_RESULT.value, 'w') as f:
      json.dump(dataclasses.asdict(timing), f)
    return
  names = _ROWS.value or (list(QUICK_ROWS) if _QUICK.value else default_rows())
  try:
    rows = list({row.id: row for row in (Row.parse(n, _PRECISION.value) for n in names)}.values())
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  budget = _BUDGET.value or (QUICK_BUDGET_S if _QUICK.value else 0.0)
  host_batch = batch_of() if _IN_PROCESS.value else None
  print(
    f'timing {len(rows)} rows of {2 * config.data.num_ids_per_batch * config.data.num_pos}'
    f'-image steps of {config_name}' + (f', within {budget:.0f} s' if budget else ''),
    flush=True,
  )
  start = time.perf_counter()
  timings, missing = {}, {}
  for row in rows:
    remaining = budget - (time.perf_counter() - start) if budget else None
    if remaining is not None and remaining < 10:
      missing[row.id] = 'skipped: the budget is spent'
      continue
    print(f'+ {row.id}', flush=True)
    if _IN_PROCESS.value:
      try:
        result = run_row(row, config, host_batch, num_classes, warmup, steps)
      except RuntimeError as error:
        result = f'failed: {error}'
      gc.collect()
    else:
      result = run_row_in_subprocess(row, steps, warmup, remaining)
    if isinstance(result, Timing):
      timings[row.id] = result
    else:
      missing[row.id] = result
  lines = format_report(config, config_name, num_classes, warmup, steps, timings, missing)
  report = '\n'.join(lines) + '\n'
  print('\n' + report, end='', flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(report)
    print(f'written to {_OUT.value}')
  if not timings:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
