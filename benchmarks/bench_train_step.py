"""Step time of the pmapped CAL train step, against ResNet identity-loss steps.

Run from the repository root:

  python benchmarks/bench_train_step.py                  # ResNet-50, 288x144, batch 64
  python benchmarks/bench_train_step.py --steps 20 --warmup 2
  python benchmarks/bench_train_step.py --config configs/tiny.py --steps 3 --warmup 1
  python benchmarks/bench_train_step.py --config.data.num_ids_per_batch=16 --no-torch

For the config's network, image size and batch (P identities x (K visible + K
infrared) images, whole identities per device, split over the local devices
as the sampler splits them), it times four training steps on the same batch:

  jax CAL            `train_step.make_p_train_step(config)`: Eq. (20) in full;
  jax CAL global_id  the same step with every loss weight 0 but `global_id`
                     (the CAL forward, the host matching and the zero-weighted
                     terms still run: only the loss changes);
  jax ResNet ID      a pmapped step of the backbone alone (one stem), global
                     average pool, BNNeck, bias-free classifier, cross-entropy,
                     SGD with momentum: AGW's baseline without its triplet loss;
  torch ResNet ID    the same network and optimiser in plain PyTorch (NCHW,
                     `torch.set_num_threads(os.cpu_count())`), where torch is
                     installed and --no-torch is not given.

For each: the first call (for JAX: tracing, XLA compilation and one step; for
torch: one step with its first allocations), then --warmup untimed steps, then
the median and mean of --steps timed steps (each waited for with
`block_until_ready`) and images/s at the median. For the CAL steps, the time
spent in the host Hungarian solver (`match_distill.solve_assignments_on_host`,
wrapped with a timer before the step is traced) as a share of the step time:
the solver runs once per device and step, so with several devices its time is
the sum over devices (their calls may overlap).
The batch is placed on the devices once, outside the timed region. Figures
only, no assertions; other work on the same machine makes them noisy.

Precision, memory and utilisation (`--dtypes`, `--remat`, `--peak-tflops`):
the JAX steps are timed once per dtype of --dtypes (float32, bfloat16: the
`config.model.dtype` of the mixed-precision mode), and the CAL step twice more
with every ResNet stage rematerialised when --remat is given
(`remat blocks`: each residual block; `remat`: nested, each stage as well,
the default of `config.model.remat_nested`). Each JAX row
gives the model FLOPs of one step as XLA's cost analysis of the compiled step
counts them (all devices), beside a hand count of the backbone's convolutions
(3 x forward: the forward pass, and the backward pass's two products per
convolution, the input gradient and the weight gradient); the compiled
step's memory (arguments, outputs not aliased to them, and temporaries,
`memory_analysis`) and,
where the device reports it, the peak device memory (`memory_stats`); and
the MFU: achieved FLOP/s over the device's peak for the row's dtype (known
accelerators by `device_kind`, or --peak-tflops; none on a CPU). PyTorch's
peak memory is `torch.cuda.max_memory_allocated` on a GPU, and the growth of
the process's peak RSS over its step on a CPU (measured first, before JAX
allocates: the high-water mark only rises).
"""

import copy
import dataclasses
import datetime
import functools
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

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

from cal_jax import distributed as parallel  # noqa: E402
from cal_jax.losses import match_distill  # noqa: E402
from cal_jax.models import resnet  # noqa: E402
from cal_jax.models.batch_norm import BatchNorm  # noqa: E402
from cal_jax.models.cal import classifier_init, compute_dtype, create_model  # noqa: E402
from cal_jax.training.state import TrainState, create_train_state  # noqa: E402
from cal_jax.training.step import make_p_train_step  # noqa: E402

try:
  import torch
except ImportError:
  torch = None

_DEFAULT_CONFIG = os.path.join(_ROOT, 'configs', 'default.py')
_CONFIG = config_flags.DEFINE_config_file(
  'config', _DEFAULT_CONFIG, 'Configuration file.', lock_config=True
)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per variant.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after the first call.')
_NUM_CLASSES = flags.DEFINE_integer('num-classes', 395, 'Training identities (SYSU-MM01: 395).')
_NO_TORCH = flags.DEFINE_boolean('no-torch', False, 'Skip the PyTorch reference step.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'config.model.dtype values to time.')
_REMAT = flags.DEFINE_boolean('remat', True, 'Also time the CAL step with remat on all stages.')
_PEAK = flags.DEFINE_float(
  'peak-tflops', 0.0, "The device's peak dense TFLOP/s for MFU (0: by device_kind, if known)."
)

# Peak dense TFLOP/s per device by `device_kind` substring: (float32, bfloat16). float32 is
# the non-tensor-core rate on NVIDIA GPUs (XLA's default precision for float32 matrix
# products is TF32 on Ampere and later: its MFU against this peak can exceed 100%).
PEAK_TFLOPS = {
  'H200': (67.0, 989.0),
  'H100': (67.0, 989.0),
  'A100': (19.5, 312.0),
  'TPU v4': (275.0, 275.0),
  'TPU v5 lite': (197.0, 197.0),
  'TPU v5p': (459.0, 459.0),
  'TPU v6 lite': (918.0, 918.0),
}


@dataclasses.dataclass
class Timing:
  """Timings of one step variant, in seconds."""

  name: str
  first_call: float
  steps: list[float]
  images: int
  callback: float | None = None  # host solver time summed over the timed steps
  dtype: str = 'float32'
  flops: float | None = None  # per step, all devices, XLA's cost analysis
  compiled_bytes: float | None = None  # per device: arguments + outputs + temporaries
  peak_bytes: float | None = None  # per device, memory_stats()'s peak, where reported

  @property
  def median(self) -> float:
    return statistics.median(self.steps)

  @property
  def mean(self) -> float:
    return statistics.fmean(self.steps)


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


def peak_tflops(dtype: str) -> float | None:
  """The device's peak for `dtype`: --peak-tflops, else the table by device kind."""
  if _PEAK.value > 0:
    return _PEAK.value
  kind = jax.local_devices()[0].device_kind
  for name, peaks in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return peaks[0] if dtype == 'float32' else peaks[1]
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
    model = create_model(config, num_classes, axis_name=parallel.AXIS)
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
  timing.callback = sum(timer.durations)
  timing.dtype = config.model.get('dtype', 'float32')
  timing.flops, timing.compiled_bytes, timing.peak_bytes = flops, size, device_peak_bytes()
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
  timing.peak_bytes = device_peak_bytes()
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


def time_torch_resnet_step(
  config: ml_collections.ConfigDict,
  batch: dict[str, np.ndarray],
  num_classes: int,
  warmup: int,
  steps: int,
) -> Timing:
  """`torch_resnet_identity` and `torch.optim.SGD` on the same batch, NCHW, on the GPU
  where torch has one; with its peak memory (see the module doc)."""
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(config.seed)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  rss_before = peak_rss_bytes()
  m, optim = config.model, config.optim
  model = torch_resnet_identity(m.depth, m.width, m.last_stride, num_classes).train().to(device)
  optimizer = torch.optim.SGD(
    [p for p in model.parameters() if p.requires_grad],
    lr=optim.base_lr,
    momentum=optim.momentum,
    weight_decay=optim.weight_decay,
    nesterov=optim.nesterov,
  )
  images = torch.from_numpy(batch['image'].reshape((-1,) + batch['image'].shape[2:]))
  images = images.permute(0, 3, 1, 2).contiguous().to(device)
  labels = torch.from_numpy(batch['label'].reshape(-1).astype(np.int64)).to(device)
  loss_fn = torch.nn.CrossEntropyLoss()

  def run_step() -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(images), labels).backward()
    optimizer.step()
    if device == 'cuda':
      torch.cuda.synchronize()

  timing = time_steps('torch ResNet ID f32', run_step, warmup, steps, labels.numel())
  timing.flops = conv_training_flops(config)  # torch counts nothing: the hand count
  if device == 'cuda':
    timing.peak_bytes = float(torch.cuda.max_memory_allocated())
  else:
    timing.peak_bytes = float(peak_rss_bytes() - rss_before)
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


def print_report(
  config: ml_collections.ConfigDict,
  config_name: str,
  devices: int,
  num_classes: int,
  timings: list[Timing],
) -> None:
  """The machine, the config, the batch, and one row of figures per step."""
  d, m = config.data, config.model
  batch = 2 * d.num_ids_per_batch * d.num_pos
  print()
  print(f'date      {datetime.datetime.now().isoformat(timespec="seconds")}')
  print(
    f'machine   processor={platform.processor() or platform.machine()!r}, '
    f'cpu_count={os.cpu_count()}, jax {jax.__version__} devices={jax.devices()}'
    + (
      f', torch {torch.__version__} threads={torch.get_num_threads()}'
      if torch is not None and not _NO_TORCH.value
      else ''
    )
  )
  print(
    f'config    {config_name}: ResNet-{m.depth} width {m.width} last stride '
    f'{m.last_stride}, {d.image_height}x{d.image_width}, N_p={m.num_parts}, '
    f'{num_classes} classes'
  )
  print(
    f'batch     {batch} images = {d.num_ids_per_batch} ids x ({d.num_pos} visible + '
    f'{d.num_pos} infrared), over {devices} device(s); '
    f'{_WARMUP.value} warm-up + {len(timings[0].steps)} timed steps'
  )
  print()
  print(
    f'{"step":<24}{"first call s":>13}{"median s":>10}{"images/s":>10}{"host solver":>12}'
    f'{"GFLOP/step":>12}{"TFLOP/s":>9}{"MFU":>7}{"memory GB":>11}{"peak GB":>9}'
  )
  for t in timings:
    share = '' if t.callback is None else f'{100 * t.callback / sum(t.steps):.3g}%'
    rate = t.flops / t.median / 1e12 if t.flops else None
    peak = peak_tflops(t.dtype)
    mfu = f'{100 * rate / peak:.1f}%' if rate and peak else 'n/a'
    gb = lambda x: f'{x / 2**30:.2f}' if x is not None else 'n/a'
    print(
      f'{t.name:<24}{t.first_call:>13.2f}{t.median:>10.3f}{t.images / t.median:>10.1f}'
      f'{share:>12}{(t.flops or 0) / 1e9:>12.1f}{(rate or 0):>9.3f}{mfu:>7}'
      f'{gb(t.compiled_bytes):>11}{gb(t.peak_bytes):>9}'
    )
  by_name = {t.name: t for t in timings}
  hand = conv_training_flops(config)
  images = 2 * d.num_ids_per_batch * d.num_pos
  print()
  print(
    f"hand count: the backbone's convolutions, 3 x forward = {hand / 1e9:.1f} GFLOP per step, "
    f"{hand / images / 1e9:.2f} GFLOP per image; XLA's count of the f32 ResNet ID step: "
    + (
      f'{by_name["jax ResNet ID f32"].flops / 1e9:.1f} GFLOP'
      if by_name.get('jax ResNet ID f32') and by_name['jax ResNet ID f32'].flops
      else 'n/a'
    )
  )
  print(
    "memory GB: the compiled JAX step's arguments + outputs (those aliased to the donated "
    'arguments once) + temporaries per device; peak GB: '
    "the device's peak where it reports one, torch's on a GPU, torch's RSS growth on a CPU"
  )
  cal = by_name.get('jax CAL f32') or timings[0]
  if cal.callback is not None:
    print(
      f'host solver (CAL): {cal.callback:.4f} s in {len(cal.steps)} steps '
      f'({cal.callback / len(cal.steps) * 1e3:.2f} ms/step) = '
      f'{100 * cal.callback / sum(cal.steps):.3g}% of the step time'
    )
  reference = by_name.get('torch ResNet ID f32')
  for t in timings:
    if reference is not None and t is not reference:
      print(
        f'median step ratio  {t.name} / torch ResNet ID f32 = {t.median / reference.median:.2f}'
      )
  for dtype in ('f32', 'bf16'):
    a, b = by_name.get(f'jax CAL {dtype}'), by_name.get(f'jax ResNet ID {dtype}')
    if a and b:
      print(
        f'median step ratio  jax CAL {dtype} / jax ResNet ID {dtype} = {a.median / b.median:.2f}'
      )
  if by_name.get('jax CAL bf16') and by_name.get('jax CAL f32'):
    print(
      'median step ratio  jax CAL bf16 / jax CAL f32 = '
      f'{by_name["jax CAL bf16"].median / by_name["jax CAL f32"].median:.2f}'
    )


def main(argv: list[str]) -> None:
  """Times the steps one after another on one batch, then prints the report."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  config_name = os.path.relpath(config_flags.get_config_filename(flags.FLAGS['config']))
  num_classes, warmup, steps = _NUM_CLASSES.value, _WARMUP.value, _STEPS.value
  if steps < 1 or warmup < 0:
    raise app.UsageError('--steps must be >= 1 and --warmup >= 0')
  devices = jax.local_device_count()
  host_batch = identity_batch(config, devices, num_classes, config.seed)
  batch = jax.device_put(host_batch, parallel.local_sharding())
  print(
    f'timing {2 * config.data.num_ids_per_batch * config.data.num_pos}-image steps '
    f'of {config_name} on {devices} device(s)',
    flush=True,
  )

  timings = []
  if torch is not None and not _NO_TORCH.value:  # first: its RSS growth is measured
    timings.append(time_torch_resnet_step(config, host_batch, num_classes, warmup, steps))
    gc.collect()
  for dtype in _DTYPES.value:
    compute_dtype(dtype)  # a clear error for an unknown dtype
    variant = with_model(config, dtype=dtype)
    timings.append(
      time_cal_step(f'jax CAL {short(dtype)}', variant, batch, num_classes, warmup, steps)
    )
    gc.collect()
    if dtype == 'float32':
      timings.append(
        time_cal_step(
          'jax CAL f32 global_id', global_id_only(variant), batch, num_classes, warmup, steps
        )
      )
      gc.collect()
    timings.append(time_jax_resnet_step(variant, batch, num_classes, warmup, steps))
    gc.collect()
  if _REMAT.value:
    for nested, suffix in ((False, 'remat blocks'), (True, 'remat')):
      variant = with_model(config, dtype=_DTYPES.value[0], remat=(1, 2, 3, 4), remat_nested=nested)
      name = f'jax CAL {short(_DTYPES.value[0])} {suffix}'
      timings.append(time_cal_step(name, variant, batch, num_classes, warmup, steps))
      gc.collect()
  print_report(config, config_name, devices, num_classes, timings)


if __name__ == '__main__':
  app.run(main)
