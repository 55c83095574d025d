"""Symmetric int8 rounding with one float32 scale per slice: what the int8 KV cache
(model/kv_cache.py) and int8 weights (model/quantize.py) store.

  values, scale = quantize(x, axis)         # x ~= values * expand_dims(scale, axis)
"""

import jax.numpy as jnp

INT8_MAX = 127.0


def quantize(x, axis):
  """(int8 values, float32 scales) of x with one symmetric scale per slice along `axis`
  (an int or a tuple of ints: the axes one scale covers), max |x| -> 127; the scales
  have those axes removed. A slice of zeros gets scale 0 and values 0."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / INT8_MAX
  values = jnp.round(x / jnp.where(scale == 0, 1.0, scale))
  return values.astype(jnp.int8), jnp.squeeze(scale, axis)
