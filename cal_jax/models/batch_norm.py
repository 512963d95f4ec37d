"""Batch normalisation that matches `torch.nn.BatchNorm{1,2}d` to the letter.

Flax's `nn.BatchNorm` keeps the *biased* batch variance in its running average;
PyTorch keeps the unbiased one (n / (n - 1)). Imported or exported weights and
resumed statistics only agree when the update rule agrees too, so this module
implements PyTorch's rule:

  training:  y = (x - mean_b) / sqrt(var_b + eps) * scale + bias
             running_mean <- (1 - m) * running_mean + m * mean_b
             running_var  <- (1 - m) * running_var  + m * var_b * n / (n - 1)
  eval:      y = (x - running_mean) / sqrt(running_var + eps) * scale + bias

with m = 0.1 (PyTorch's `momentum`) and eps = 1e-5. With `axis_name` set, the
batch moments are averaged over that mapped axis (synchronised BN), so a batch
split over devices is normalised exactly as the whole batch would be on one.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """PyTorch-compatible batch norm over all axes but the last (channels).

  Attributes:
    use_running_average: normalise with the running statistics (eval mode).
    momentum: PyTorch's momentum: the weight of the *new* batch statistics.
    epsilon: added to the variance.
    use_bias: learn a shift; BNNeck turns it off, as in the AGW code.
    axis_name: pmap/shard_map axis over which batch moments are averaged.
  """

  use_running_average: bool | None = None
  momentum: float = 0.1
  epsilon: float = 1e-5
  use_bias: bool = True
  axis_name: str | None = None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    statistics_rows: int | None = None,
  ) -> jax.Array:
    """Normalises x; in training, with the moments of its first `statistics_rows`
    rows (axis 0; None: all). Rows appended after them are normalised with those
    moments held constant: they change neither the moments nor the running
    statistics, and no gradient reaches the counted rows through them."""
    use_running_average = nn.merge_param(
      'use_running_average', self.use_running_average, use_running_average
    )
    features = x.shape[-1]
    reduce_axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = (
      self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
      if self.use_bias
      else jnp.zeros((features,), jnp.float32)
    )

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      counted = x if statistics_rows is None else x[:statistics_rows]
      x32 = counted.astype(jnp.promote_types(x.dtype, jnp.float32))
      # Two passes (mean, then centred second moment) as PyTorch does, so that
      # large activations do not lose the variance to cancellation.
      mean = self._mean_over_batch(x32, reduce_axes)
      var = self._mean_over_batch(jnp.square(x32 - mean), reduce_axes)
      count = 1
      for axis in reduce_axes:
        count *= counted.shape[axis]
      if self.axis_name is not None:
        count = count * jax.lax.psum(1, self.axis_name)
      if not self.is_initializing():
        unbiased = var * count / jnp.maximum(count - 1, 1)
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased

    if statistics_rows is not None and not use_running_average:
      # The appended rows: the counted rows' moments, held constant for them.
      inv = jax.lax.rsqrt(var + self.epsilon)
      counted_out = (x[:statistics_rows] - mean) * (inv * scale) + bias
      stop = jax.lax.stop_gradient
      rest = (x[statistics_rows:] - stop(mean)) * (stop(inv) * scale) + bias
      return jnp.concatenate([counted_out, rest]).astype(x.dtype)
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    return ((x - mean) * inv + bias).astype(x.dtype)

  def _mean_over_batch(self, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    mean = jnp.mean(x, axis=axes)
    if self.axis_name is not None:
      mean = jax.lax.pmean(mean, self.axis_name)
    return mean
