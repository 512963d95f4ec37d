"""Random stand-ins for CAL's training outputs, and the default loss weights, for loss tests."""

import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import default

RNG = np.random.default_rng(3)


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def fake_outputs(b=4, k=3, n=6, classes=5, c=8):
  """Random stand-ins for CAL's training outputs (maps on the simplex)."""
  maps = lambda: jnp.asarray(_softmax(RNG.normal(size=(b, k, n))), jnp.float32)
  normal = lambda *shape: jnp.asarray(RNG.normal(size=shape), jnp.float32)
  out = {
    'global_logits': normal(2 * b, classes),
    'part_logits_vis': normal(b, k, classes),
    'part_logits_ir': normal(b, k, classes),
    'selected_vis': jnp.abs(normal(b, n, k)),
    'selected_ir': jnp.abs(normal(b, n, k)),
  }
  for name in ('vv', 'ii', 'vi', 'iv'):
    out[f'f_{name}'] = normal(b, k, c)
    out[f'sim_{name}'] = maps()
    out[f'logits_{name}'] = normal(b, k, classes)
  return out


def loss_weights(**changes):
  """`configs/default.py`'s loss weights, with `changes`."""
  weights = ml_collections.ConfigDict(default.get_config().loss.to_dict())
  for key, value in changes.items():
    weights[key] = value
  return weights
