"""Symmetric rounding to a narrow dtype with one float32 scale per slice: what a
quantized KV cache (model/kv_cache.py: int8, float8_e4m3fn) and quantized weights
(model/quantize.py: int8, int4) store.

  values, scale = quantize(x, axis)                # int8
  values, scale = quantize(x, axis, jnp.int4)      # x ~= values * expand_dims(scale, axis)

The largest |x| of a slice maps to the dtype's largest value (127, 7, 448); integers
round to nearest, float8 rounds as its conversion does (to nearest even).
"""

import jax.numpy as jnp

# The largest magnitude each dtype stores (int4: 7, symmetric; -8 is never used).
LARGEST = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.int4): 7.0,
           jnp.dtype(jnp.float8_e4m3fn): 448.0}


def quantize(x, axis, dtype=jnp.int8):
  """(values in `dtype`, float32 scales) of x with one symmetric scale per slice along
  `axis` (an int or a tuple of ints: the axes one scale covers), max |x| -> LARGEST;
  the scales have those axes removed. A slice of zeros gets scale 0 and values 0."""
  dtype = jnp.dtype(dtype)
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / LARGEST[dtype]
  scaled = x / jnp.where(scale == 0, 1.0, scale)
  if jnp.issubdtype(dtype, jnp.integer):
    scaled = jnp.round(scaled)
  return scaled.astype(dtype), jnp.squeeze(scale, axis)


def bits(dtype) -> int:
  """The storage width of `dtype` in bits (int4: 4; NumPy's itemsize says 1 byte)."""
  dtype = jnp.dtype(dtype)
  return (jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else
          jnp.finfo(dtype).bits if jnp.issubdtype(dtype, jnp.floating) else 8 * dtype.itemsize)
