"""Where the CPU training step of the plain ResNet goes, against PyTorch, variant by variant.

Run from the repository root:

  python benchmarks/profile_cpu_step.py                       # ResNet-50, 288x144, batch 8
  python benchmarks/profile_cpu_step.py --batch 16 --steps 3
  python benchmarks/profile_cpu_step.py --variants jax,torch

For the identity-loss ResNet of `bench_train_step.py` (backbone, pooling, BNNeck,
classifier) it times, each variant in a fresh process (its own XLA_FLAGS):

  forward     the training-mode forward pass and the loss
  backward    value_and_grad of the loss, minus the forward time
  convolutions alone  the same forward and backward through the backbone's
              main-path convolutions alone, chained (no batch norm, ReLU,
              pooling or projection shortcuts), to split the time between the
              convolutions and everything else

and, for the JAX variants, the compiled step's XLA FLOPs and its op counts
(convolutions, transposes, copies, reduce-windows) from the optimised HLO.

Variants (``--variants``, comma-separated):

  jax            cal_jax's ResNet: PyTorch-exact batch norm, explicit padding, NHWC
  jax_flax_bn    the same with Flax's `nn.BatchNorm` (fused moments, biased running var)
  jax_no_thunks  --xla_cpu_use_thunk_runtime=false (the older XLA:CPU runtime)
  jax_onednn     --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true
  jax_fast_minmax  --xla_cpu_enable_fast_min_max=true
  jax_xnnpack    --xla_cpu_use_xnnpack=true
  jax_nchw       the convolution chain in NCHW / OIHW (the network itself stays NHWC:
                 Flax's Conv has no other layout), to see whether XLA:CPU's
                 convolutions and their gradients are faster in PyTorch's layout
  torch          PyTorch's ResNet (NCHW, oneDNN), as in bench_train_step.py

Figures only, no assertions; each line is also printed as JSON for the record.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)

VARIANT_FLAGS = {
  'jax': '',
  'jax_flax_bn': '',
  'jax_no_thunks': '--xla_cpu_use_thunk_runtime=false',
  'jax_onednn': '--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true',
  'jax_fast_minmax': '--xla_cpu_enable_fast_min_max=true',
  'jax_xnnpack': '--xla_cpu_use_xnnpack=true',
  'jax_nchw': '',
  'torch': '',
}


def _median_time(function, steps: int) -> float:
  function()  # compilation, first allocations
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    function()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _hlo_counts(text: str) -> dict[str, int]:
  ops = ('convolution', 'transpose', 'copy', 'reduce-window', 'fusion', 'custom-call')
  return {op: len(re.findall(rf'= [^=]*? {op}\(', text)) for op in ops}


def child_jax(args: argparse.Namespace) -> dict:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.path.insert(0, _ROOT)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from cal_jax.models import resnet

  if args.child == 'jax_flax_bn':

    class FlaxBatchNorm(nn.Module):
      use_running_average: bool | None = None
      axis_name: str | None = None

      @nn.compact
      def __call__(self, x):
        return nn.BatchNorm(
          use_running_average=self.use_running_average,
          momentum=0.9,
          epsilon=1e-5,
          axis_name=self.axis_name,
          name='bn',
        )(x)

    resnet.BatchNorm = FlaxBatchNorm
  import bench_train_step as bench

  model = bench.ResNetIdentity(args.classes, args.depth, args.width, 1)
  rng = jax.random.key(0)
  images = jax.random.normal(rng, (args.batch, args.height, args.image_width, 3))
  labels = jnp.arange(args.batch) % args.classes
  variables = jax.jit(lambda x: model.init(rng, x, False))(images)

  def loss_fn(params, batch_stats, x):
    logits, _ = model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, True, mutable=['batch_stats']
    )
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  forward = jax.jit(loss_fn)
  grad = jax.jit(jax.value_and_grad(loss_fn))
  params, stats = variables['params'], variables['batch_stats']
  out = {
    'forward': _median_time(lambda: forward(params, stats, images).block_until_ready(), args.steps),
    'forward_backward': _median_time(
      lambda: jax.block_until_ready(grad(params, stats, images)), args.steps
    ),
  }
  compiled = grad.lower(params, stats, images).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out['gflop'] = float(cost.get('flops', 0.0)) / 1e9 if cost else None
  out['hlo'] = _hlo_counts(compiled.as_text())

  # The convolutions alone, in the same order and shapes: conv -> conv -> ... (no BN, ReLU).
  convs = _conv_shapes(args)
  # He-scaled: activations stay O(1) along the chain (no denormals deep in it).
  kernels = [
    jax.random.normal(jax.random.fold_in(rng, i), (k, k, cin, cout)) * (2 / (k * k * cin)) ** 0.5
    for i, (k, _, cin, cout) in enumerate(convs)
  ]
  layout = ('NCHW', 'OIHW', 'NCHW') if args.child == 'jax_nchw' else ('NHWC', 'HWIO', 'NHWC')
  if args.child == 'jax_nchw':  # the same arrays, transposed once outside the timed calls
    kernels = [jnp.transpose(w, (3, 2, 0, 1)) for w in kernels]
    images = jnp.transpose(images, (0, 3, 1, 2))

  def conv_chain(kernels, x):
    h, total = x, 0.0
    for index, ((k, stride, _, _), w) in enumerate(zip(convs, kernels)):
      pad = (k - 1) // 2
      h = jax.lax.conv_general_dilated(
        h, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=layout
      )
      if index == 0:  # where the max-pool halves the map
        h = h[:, :, ::2, ::2] if layout[0] == 'NCHW' else h[:, ::2, ::2]
      total = total + jnp.mean(h)
    return total

  conv_fwd = jax.jit(conv_chain)
  conv_grad = jax.jit(jax.grad(conv_chain))
  out['conv_forward'] = _median_time(
    lambda: conv_fwd(kernels, images).block_until_ready(), args.steps
  )
  out['conv_forward_backward'] = _median_time(
    lambda: jax.block_until_ready(conv_grad(kernels, images)), args.steps
  )
  return out


def _conv_shapes(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
  """(kernel, stride, in, out) of the backbone's main-path convolutions in order (the
  projection shortcuts left out: a chain needs each output to feed the next)."""
  sys.path.insert(0, _ROOT)
  from cal_jax.models import resnet

  kind, blocks = resnet.ARCHITECTURES[args.depth]
  expansion = resnet.block_expansion(args.depth)
  shapes = [(7, 2, 3, args.width)]  # the stem; the max-pool's halving follows it
  channels = args.width
  for stage, (n, stage_stride) in enumerate(zip(blocks, (1, 2, 2, 1))):
    features = args.width * 2**stage
    for index in range(n):
      stride = stage_stride if index == 0 else 1
      if kind == 'bottleneck':
        shapes += [
          (1, 1, channels, features),
          (3, stride, features, features),
          (1, 1, features, features * expansion),
        ]
      else:
        shapes += [(3, stride, channels, features), (3, 1, features, features)]
      channels = features * expansion
  return shapes


def child_torch(args: argparse.Namespace) -> dict:
  sys.path.insert(0, _ROOT)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_train_step as bench
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  model = bench.torch_resnet_identity(args.depth, args.width, 1, args.classes).train()
  images = torch.randn(args.batch, 3, args.height, args.image_width)
  labels = torch.arange(args.batch) % args.classes
  loss_fn = torch.nn.CrossEntropyLoss()

  def forward():
    with torch.no_grad():
      loss_fn(model(images), labels)

  def forward_backward():
    model.zero_grad(set_to_none=True)
    loss_fn(model(images), labels).backward()

  out = {
    'forward': _median_time(forward, args.steps),
    'forward_backward': _median_time(forward_backward, args.steps),
  }
  convs = _conv_shapes(args)
  # He-scaled, as in the chain of JAX: activations stay O(1) (no denormals deep in the chain).
  weights = [
    torch.nn.Parameter(torch.randn(cout, cin, k, k) * (2 / (k * k * cin)) ** 0.5)
    for k, _, cin, cout in convs
  ]

  def conv_chain():
    h, total = images, 0.0
    for index, ((k, stride, _, _), w) in enumerate(zip(convs, weights)):
      h = torch.nn.functional.conv2d(h, w, stride=stride, padding=(k - 1) // 2)
      h = h[:, :, ::2, ::2] if index == 0 else h  # where the max-pool halves the map
      total = total + h.mean()
    return total

  def conv_forward():
    with torch.no_grad():
      conv_chain()

  def conv_forward_backward():
    for w in weights:
      w.grad = None
    conv_chain().backward()

  out['conv_forward'] = _median_time(conv_forward, args.steps)
  out['conv_forward_backward'] = _median_time(conv_forward_backward, args.steps)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--depth', type=int, default=50)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--height', type=int, default=288)
  parser.add_argument('--image_width', type=int, default=144)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--classes', type=int, default=395)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--variants', default=','.join(VARIANT_FLAGS))
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    result = child_torch(args) if args.child == 'torch' else child_jax(args)
    print('RESULT ' + json.dumps(result), flush=True)
    return

  variants = args.variants.split(',')
  unknown = [v for v in variants if v not in VARIANT_FLAGS]
  if unknown:
    parser.error(f'unknown variants {unknown}; choose from {list(VARIANT_FLAGS)}')
  print(
    f'ResNet-{args.depth} width {args.width}, {args.height}x{args.image_width}, batch '
    f'{args.batch}, {args.steps} timed calls each (median), cpu_count={os.cpu_count()}'
  )
  results = {}
  for variant in variants:
    env = dict(os.environ, XLA_FLAGS=VARIANT_FLAGS[variant], TF_CPP_MIN_LOG_LEVEL='2')
    command = [sys.executable, os.path.abspath(__file__), '--child', variant] + [
      f'--{k}={v}' for k, v in vars(args).items() if k not in ('child', 'variants')
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith('RESULT ')]
    if done.returncode or not line:
      print(f'{variant}: failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}')
      continue
    results[variant] = json.loads(line[-1][len('RESULT ') :])
    r = results[variant]
    backward = r['forward_backward'] - r['forward']
    conv_backward = r['conv_forward_backward'] - r['conv_forward']
    print(
      f'{variant:<16} forward {r["forward"]:7.3f} s  backward {backward:7.3f} s  '
      f'convolutions alone: forward {r["conv_forward"]:7.3f} s backward {conv_backward:7.3f} s'
      + (f'  XLA {r["gflop"]:.0f} GFLOP, HLO ops {r["hlo"]}' if 'hlo' in r else '')
    )
    print('  ' + json.dumps({variant: r}))
  reference = results.get('torch')
  if reference:
    print()
    for variant, r in results.items():
      if variant == 'torch':
        continue
      print(
        f'{variant:<16} / torch: forward {r["forward"] / reference["forward"]:5.2f}x  '
        f'forward+backward {r["forward_backward"] / reference["forward_backward"]:5.2f}x  '
        'convolutions alone '
        f'{r["conv_forward_backward"] / reference["conv_forward_backward"]:5.2f}x'
      )


if __name__ == '__main__':
  main()
