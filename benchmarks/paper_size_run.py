"""The paper's size, run once as a user would: `configs/sysu.py` (the paper formulation,
ResNet-50, 288x144, batch 8 x (4 + 4)) on a generated SYSU-MM01-layout tree, starting from a
torchvision-format ResNet-50 state dict, for 2 steps, then the full evaluation.

  python benchmarks/paper_size_run.py --workdir /tmp/paper_size [--config.FIELD=VALUE ...]

It writes, under --workdir, the data set tree (SYSU-MM01/, generated people at 288 pixels),
a torchvision ResNet-50 state dict with random weights in torchvision's layout
(resnet50-random.safetensors; the loader is the one ImageNet weights go through), and the
run (run/: log.txt, checkpoints, eval_results.json), then prints what the run took. The
weights are random, so the figures mean nothing: this checks that the paper's setting
loads its weights, trains Eq. 20's terms and evaluates end to end on this machine, and
how long each part takes. `--width 8` shrinks the network (the tests do); the default, 64,
is torchvision's ResNet-50.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cal_jax.data.datasets import synthetic  # noqa: E402
from cal_jax.models import torchvision_weights  # noqa: E402


def write_random_resnet50(path: str, width: int, seed: int = 0) -> None:
  """A torchvision ResNet-50 state dict (as `torchvision.models.resnet50().state_dict()`
  keys and shapes, at `width`) with He-normal convolutions and identity batch norms."""
  from safetensors.numpy import save_file

  rng = np.random.default_rng(seed)
  state = {}
  for key, target in torchvision_weights.param_mapping(50, width).items():
    shape = torchvision_weights.torch_shape(target)
    leaf = key.rsplit('.', 1)[-1]
    if target.kind == 'conv':
      fan_in = int(np.prod(shape[1:]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif leaf in ('weight', 'running_var'):
      value = np.ones(shape)
    else:  # bias, running_mean
      value = np.zeros(shape)
    state[key] = value.astype(np.float32)
  features = 32 * width
  state['fc.weight'] = rng.normal(0.0, 0.01, (1000, features)).astype(np.float32)
  state['fc.bias'] = np.zeros((1000,), np.float32)
  save_file(state, path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--width', type=int, default=64, help="ResNet-50's stem width (64)")
  parser.add_argument('--num_ids', type=int, default=18, help='generated identities')
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--run', default='run', help='the run folder under --workdir')
  args, extra = parser.parse_known_args()  # the rest: --config.FIELD=VALUE, passed on
  workdir = os.path.abspath(args.workdir)
  root = os.path.join(workdir, 'SYSU-MM01')
  weights = os.path.join(workdir, 'resnet50-random.safetensors')
  start = time.perf_counter()
  if not os.path.isdir(root):
    synthetic.generate('sysu', root, args.num_ids, seed=0, height=288)
  if not os.path.isfile(weights):
    write_random_resnet50(weights, args.width)
  prepared = time.perf_counter() - start
  command = [
    sys.executable,
    '-m',
    'cal_jax.main',
    '--config',
    os.path.join(REPO, 'configs', 'sysu.py'),
    '--workdir',
    os.path.join(workdir, args.run),
    f'--config.data.manual_dir={root}',
    f'--config.data.data_dir={os.path.join(workdir, "tfds")}',
    f'--config.model.pretrained={weights}',
    f'--config.model.width={args.width}',
    f'--config.optim.steps_per_epoch={args.steps}',
    '--config.optim.num_epochs=1',
    '--config.optim.warmup_epochs=1',
    f'--config.log_every_steps={args.steps}',
    *extra,
  ]
  print('+ ' + ' '.join(command), flush=True)
  start = time.perf_counter()
  done = subprocess.run(command, cwd=REPO, check=False)
  print(
    f'paper size (width {args.width}): data and weights {prepared:.0f} s, '
    f'the run {time.perf_counter() - start:.0f} s (exit {done.returncode}); '
    f'log: {os.path.join(workdir, args.run, "log.txt")}',
    flush=True,
  )
  sys.exit(done.returncode)


if __name__ == '__main__':
  main()
