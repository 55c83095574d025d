"""Rotary position embeddings: pure functions of (RoPE config, positions).

Rotation follows Hugging Face's Llama convention (the two halves of the head
dimension are the real and imaginary parts), so converted checkpoints match.
Context extension stretches the frequencies (`inv_frequencies`, one function for
every scaling type, matching transformers' rope initialisation) and, for YaRN, scales
cos and sin (`attention_factor`). model/config.py RopeScaling lists the types.
Dimension letters: core/__init__.py (D = head_dim).
"""

import math

import jax.numpy as jnp
import numpy as np

from model.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int, seq_len=None):
  """Inverse frequencies [D // 2], float64 NumPy constants of the model.

  `seq_len` (the current length: max position + 1, may be a traced scalar) matters
  only for `dynamic`, whose result is then a float32 jnp array.
  """
  scaling = rope.scaling
  kind, factor = scaling.type, scaling.factor
  exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  if kind == "dynamic" and seq_len is not None:
    original = scaling.original_max_len
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), original)
    base = rope.theta * ((factor * length / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return 1.0 / base ** jnp.asarray(exponents, jnp.float32)
  inv_freq = 1.0 / rope.theta ** exponents
  if kind in ("none", "dynamic"):  # dynamic at or below the original length: plain RoPE
    return inv_freq
  if kind == "linear":  # position interpolation: position / factor
    return inv_freq / factor
  if kind == "ntk":  # a larger base, so low frequencies stretch and high ones barely move
    return 1.0 / (rope.theta * factor ** (head_dim / (head_dim - 2))) ** exponents
  if kind == "yarn":
    # Dimensions that turn more than beta_fast times over the original context keep
    # their frequency, those turning fewer than beta_slow times are interpolated, a
    # linear ramp in between ("NTK-by-parts").
    def dimension(rotations):
      return (head_dim * math.log(scaling.original_max_len / (rotations * 2 * math.pi))
              / (2 * math.log(rope.theta)))
    low, high = dimension(scaling.beta_fast), dimension(scaling.beta_slow)
    if scaling.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)
  if kind == "llama3":
    original = scaling.original_max_len
    wavelength = 2 * math.pi / inv_freq
    low_wavelength = original / scaling.low_freq_factor   # longer waves: interpolated
    high_wavelength = original / scaling.high_freq_factor  # shorter waves: kept
    smooth = ((original / wavelength - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    medium = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelength > low_wavelength, inv_freq / factor,
                    np.where(wavelength < high_wavelength, inv_freq, medium))
  raise AssertionError(kind)  # RopeScaling rejects unknown types


def attention_factor(rope: RopeConfig) -> float:
  """The scale of cos and sin: YaRN's attention temperature, 1 for the other types."""
  scaling = rope.scaling
  if scaling.type != "yarn":
    return 1.0
  if scaling.attention_factor > 0:
    return scaling.attention_factor
  return 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0


def rotary_tables(rope: RopeConfig, head_dim: int, positions):
  """cos, sin tables [B, L, D // 2] float32 for int positions [B, L].

  positions may be sharded anyhow; `dynamic` scaling reads their global maximum.
  """
  seq_len = positions.max() + 1 if rope.scaling.type == "dynamic" else None
  inv_freq = jnp.asarray(inv_frequencies(rope, head_dim, seq_len), jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  scale = attention_factor(rope)
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rotary(x, cos, sin):
  """Rotates x [B, L, H, D] (or [B, L, K, D]) by the tables [B, L, D // 2]; computed in
  float32."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  real, imag = x32[..., :half], x32[..., half:]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, L, D/2] -> [B, L, 1, D/2]
  rotated = jnp.concatenate([real * cos - imag * sin, imag * cos + real * sin], axis=-1)
  return rotated.astype(x.dtype)
