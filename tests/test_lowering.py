"""The Pallas kernels lower for real TPU (Mosaic) from this CPU-only machine.

Interpret mode checks the numerics but not that Mosaic accepts the kernels' block
shapes, index maps and ops; `jax.export` for platform "tpu" runs that lowering. It
does not run the Mosaic compiler itself (VMEM limits, layouts): that needs hardware.
"""

import jax
import jax.numpy as jnp
import pytest

from parallel.kernels import pallas_tpu

# (batch, length, q heads, kv heads, head dim, dtype)
SHAPES = {
    "bf16-gqa4-d128": (1, 1024, 8, 2, 128, jnp.bfloat16),
    "f32-mha-d64": (2, 512, 4, 4, 64, jnp.float32),
}


def _structs(batch, length, q_heads, kv_heads, head_dim, dtype):
  array = lambda *shape, dtype=dtype: jax.ShapeDtypeStruct(shape, dtype)
  q, kv = array(batch, length, q_heads, head_dim), array(batch, length, kv_heads, head_dim)
  tokens = [array(batch, length, dtype=jnp.int32)] * 4
  return q, kv, tokens, array(batch, length, q_heads, dtype=jnp.float32)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_tpu_kernels_lower_for_tpu(shape):
  q, kv, tokens, lse = _structs(*SHAPES[shape])
  opts = dict(causal=True, scale=0.125, block_q=256, block_kv=256, interpret=False)

  def forward(q, k, v, *tokens):
    return pallas_tpu.block_attention(q, k, v, *tokens, **opts)

  def backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout):
    return pallas_tpu.block_attention_bwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout,
                                          **opts)

  exported = jax.export.export(jax.jit(forward), platforms=["tpu"])(q, kv, kv, *tokens)
  assert exported.mlir_module().count("tpu_custom_call") == 1
  exported = jax.export.export(jax.jit(backward), platforms=["tpu"])(q, kv, kv, *tokens, q, lse, q)
  assert exported.mlir_module().count("tpu_custom_call") == 2  # dK/dV and dQ kernels


def test_tpu_block_sizes_are_checked():
  q, kv, tokens, _ = _structs(1, 512, 4, 4, 64, jnp.float32)
  with pytest.raises(ValueError, match="attention.block_kv=96 a multiple of 128"):
    jax.eval_shape(lambda *a: pallas_tpu.block_attention(*a, causal=True, scale=1.0, block_q=64,
                                                         block_kv=96), q, kv, kv, *tokens)
