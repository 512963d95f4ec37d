"""How local a backbone's tokens are: a pretrained file against the same network from scratch.

  python benchmarks/locality.py --weights pretrained/fractal_w16.safetensors [--images 64]

Both networks are configs/synthetic.py's backbone (ResNet-50 of model.width, last stride
1, in evaluation mode), on generated person images at its 128x64 (8x4 token maps),
normalised as the input pipeline normalises them. 'scratch' is the network as CAL
initialises it (torchvision's initialisation, identity batch norms). Two measures:

  position cosine   the cosine between IN(T) (Eq. 7) of two different images at the
                    same token position, averaged over positions and image pairs. Near
                    1: a token is a code of its position, the same in every image.
  distant change    the bottom half of each image (rows 64-127) replaced by another
                    person's: how far the tokens of the top two map rows (image rows
                    0-31, at least 32 pixels from any change) move, as a fraction of
                    how far apart two different images' tokens are at that position
                    (||T'(p) - T_i(p)|| / mean over j != i of ||T_j(p) - T_i(p)||),
                    averaged over those tokens; beside it the same for the bottom four
                    map rows (the changed region itself). 0: the token does not see the
                    change; 1: it moved as far as to another image's.

`--misalignment` draws the people as data.synthetic_misalignment does.
"""

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cal_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from cal_jax.data.datasets import synthetic_people as people  # noqa: E402
from cal_jax.models import resnet, torchvision_weights  # noqa: E402
from cal_jax.models.attention_adapter import instance_normalize  # noqa: E402
from configs import synthetic  # noqa: E402


def person_images(count: int, size: tuple, misalignment: bool, seed: int = 0) -> np.ndarray:
  """[count, H, W, 3] in [0, 1]: one image each of `count` identities, visible cameras."""
  images = []
  for n in range(count):
    rng = np.random.default_rng([seed, n])
    camera = dataclasses.replace(people.sample_camera(rng, 'visible'), misalignment=misalignment)
    images.append(people.render(people.sample_appearance(rng), camera, rng, size))
  return np.stack(images).astype(np.float32) / 255.0


def position_cosine(tokens: jax.Array) -> float:
  """Mean over positions and pairs i != j of cos(IN(T_i)[p], IN(T_j)[p]); tokens [B, N, C]."""
  normal = instance_normalize(tokens, tokens)
  unit = normal / jnp.linalg.norm(normal, axis=-1, keepdims=True)
  cosines = jnp.einsum('ipc,jpc->pij', unit, unit)  # [N, B, B]
  b = tokens.shape[0]
  off_diagonal = (cosines.sum((1, 2)) - jnp.trace(cosines, axis1=1, axis2=2)) / (b * (b - 1))
  return float(off_diagonal.mean())


def relative_change(before: jax.Array, after: jax.Array) -> float:
  """Mean over images i and positions p of ||after_i(p) - before_i(p)|| divided by the
  mean over j != i of ||before_j(p) - before_i(p)||; maps [B, h, w, C]."""
  b = before.shape[0]
  moved = jnp.linalg.norm(after - before, axis=-1)  # [B, h, w]
  apart = jnp.linalg.norm(before[:, None] - before[None], axis=-1).sum(1) / (b - 1)
  return float((moved / apart).mean())


def measure(variables: dict, model: resnet.ResNet, images: np.ndarray) -> dict[str, float]:
  normalise = lambda x: (x - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
  forward = jax.jit(lambda x: model.apply(variables, normalise(x), train=False))
  maps = forward(images)  # [B, 8, 4, C]
  swapped = images.copy()
  half = images.shape[1] // 2
  swapped[:, half:] = np.roll(images, 1, axis=0)[:, half:]  # another person's lower half
  after = forward(swapped)
  rows = maps.shape[1]
  return {
    'position cosine': position_cosine(maps.reshape(maps.shape[0], -1, maps.shape[-1])),
    'distant change': relative_change(maps[:, : rows // 4], after[:, : rows // 4]),
    'changed region': relative_change(maps[:, rows // 2 :], after[:, rows // 2 :]),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--weights', required=True, help='a torchvision-format .safetensors file')
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--misalignment', action='store_true')
  args = parser.parse_args()
  config = synthetic.get_config()
  size = (config.data.image_height, config.data.image_width)
  model = resnet.ResNet(
    depth=config.model.depth, width=config.model.width, last_stride=config.model.last_stride
  )
  images = person_images(args.images, size, args.misalignment)
  scratch = model.init(jax.random.key(config.seed), jnp.zeros((1, *size, 3)))
  pretrained = torchvision_weights.load_torchvision_resnet(
    args.weights, f'resnet{config.model.depth}', width=config.model.width
  )
  print(
    f'{args.images} synthetic people at {size[0]}x{size[1]}'
    f'{" (misaligned)" if args.misalignment else ""}, ResNet-{config.model.depth} of width '
    f'{config.model.width}, last stride {config.model.last_stride}:'
  )
  print(f'{"network":<12}{"position cosine":>18}{"distant change":>17}{"changed region":>17}')
  for name, variables in (('scratch', scratch), ('pretrained', pretrained)):
    m = measure(variables, model, images)
    print(
      f'{name:<12}{m["position cosine"]:>18.3f}{m["distant change"]:>17.3f}'
      f'{m["changed region"]:>17.3f}'
    )


if __name__ == '__main__':
  main()
