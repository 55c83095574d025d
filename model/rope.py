"""Rotary position embeddings: pure functions of (RoPE config, positions).

Rotation follows Hugging Face's Llama convention (the two halves of the head
dimension are the real and imaginary parts), so converted checkpoints match.
Scaling types stretch the frequencies for context extension; `inv_frequencies` is
the one place they live (the context-extension issue adds ntk, yarn, llama3, dynamic).
"""

import jax.numpy as jnp
import numpy as np

from model.config import ConfigError, RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] (float64 NumPy; constants of the model)."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  inv_freq = 1.0 / (rope.theta ** exponents)
  kind = rope.scaling.type
  if kind == "none":
    return inv_freq
  if kind == "linear":  # position interpolation: position / factor
    return inv_freq / rope.scaling.factor
  raise ConfigError(f"model.rope.scaling.type={kind!r} is not supported yet; use none or linear")


def rotary_tables(rope: RopeConfig, head_dim: int, positions):
  """cos, sin tables [B, L, head_dim // 2] float32 for int positions [B, L]."""
  inv_freq = jnp.asarray(inv_frequencies(rope, head_dim), jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
  """Rotates x [B, L, H, D] by the tables [B, L, D // 2]; computed in float32."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  real, imag = x32[..., :half], x32[..., half:]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, L, D/2] -> [B, L, 1, D/2]
  rotated = jnp.concatenate([real * cos - imag * sin, imag * cos + real * sin], axis=-1)
  return rotated.astype(x.dtype)
