"""The Pallas kernels lower for real TPU (Mosaic) and GPU (Triton) from this CPU-only machine.

Interpret mode checks the numerics but not that Mosaic or Triton accept the kernels'
block shapes, index maps and ops; `jax.export` for platform "tpu" / "cuda" runs that
lowering. It does not run the Mosaic or Triton compilers themselves (VMEM limits,
layouts, register pressure): that needs hardware.
"""

import jax
import jax.numpy as jnp
import pytest

from parallel.kernels import pallas_gpu, pallas_tpu

# (batch, length, q heads, kv heads, head dim, dtype)
SHAPES = {
    "bf16-gqa4-d128": (1, 1024, 8, 2, 128, jnp.bfloat16),
    "f32-mha-d64": (2, 500, 4, 4, 64, jnp.float32),  # a length that is not a multiple of blocks
}
# (kernel module, custom-call target, block size)
BACKENDS = {
    "tpu": (pallas_tpu, "tpu_custom_call", 256),
    "cuda": (pallas_gpu, "__gpu$xla.gpu.triton", 64),
}


def _structs(batch, length, q_heads, kv_heads, head_dim, dtype):
  array = lambda *shape, dtype=dtype: jax.ShapeDtypeStruct(shape, dtype)
  q, kv = array(batch, length, q_heads, head_dim), array(batch, length, kv_heads, head_dim)
  tokens = [array(batch, length, dtype=jnp.int32)] * 4
  return q, kv, tokens, array(batch, length, q_heads, dtype=jnp.float32)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("platform", list(BACKENDS))
def test_kernels_lower_for_hardware(platform, shape):
  kernel, target, block = BACKENDS[platform]
  q, kv, tokens, lse = _structs(*SHAPES[shape])
  opts = dict(causal=True, scale=0.125, block_q=block, block_kv=block, interpret=False)

  def forward(q, k, v, *tokens):
    return kernel.block_attention(q, k, v, *tokens, **opts)

  def backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout):
    return kernel.block_attention_bwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout,
                                      **opts)

  export = jax.export.export
  checks = [jax.export.DisabledSafetyCheck.custom_call(target)] if platform == "cuda" else []
  exported = export(jax.jit(forward), platforms=[platform], disabled_checks=checks)(
      q, kv, kv, *tokens)
  assert exported.mlir_module().count(target) == 1
  exported = export(jax.jit(backward), platforms=[platform], disabled_checks=checks)(
      q, kv, kv, *tokens, q, lse, q)
  assert exported.mlir_module().count(target) == 2  # dK/dV and dQ kernels


def test_gpu_block_sizes_are_checked():
  q, kv, tokens, _ = _structs(1, 512, 4, 4, 64, jnp.float32)
  with pytest.raises(ValueError, match="must be powers of two for the Triton kernels"):
    jax.eval_shape(lambda *a: pallas_gpu.block_attention(*a, causal=True, scale=1.0, block_q=64,
                                                         block_kv=96), q, kv, kv, *tokens)
