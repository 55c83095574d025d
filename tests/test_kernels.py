"""Every block-attention implementation against the float64 reference, forward and backward."""

import jax.numpy as jnp
import numpy as np
import pytest

from parallel.kernels import masking, pallas_gpu, pallas_tpu, reference, xla
from tests.inputs import attention_inputs

IMPLS = {"xla": xla, "pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}

# name -> (attention_inputs kwargs, causal, block size)
CASES = {
    "gqa4-causal": (dict(q_len=96, q_heads=8, kv_heads=2, head_dim=32), True, 32),
    "gqa8-noncausal": (dict(q_len=64, q_heads=8, kv_heads=1), False, 16),
    "mha-causal": (dict(q_len=64, q_heads=2, kv_heads=2), True, 16),
    "packed-segments": (dict(q_len=96, doc_len=40), True, 32),
    "packed-noncausal": (dict(q_len=96, doc_len=40), False, 32),
    # keys start 40 positions after the queries: rows 0..39 see no key at all
    "rows-without-keys": (dict(q_len=64, kv_len=48, kv_offset=40), True, 16),
    # lengths that are not a multiple of the block
    "ragged-lengths": (dict(q_len=100, kv_len=70, q_heads=8, kv_heads=2, doc_len=45), True, 32),
    # several 128-key blocks (the TPU kernels' smallest): skipping, ragged last block
    "long-packed-gqa": (dict(batch=1, q_len=300, q_heads=4, kv_heads=1, doc_len=150), True, 64),
}

TOLERANCE = {np.float32: 1e-5, jnp.bfloat16: 2e-2}


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_block_attention_matches_reference(impl, case, dtype, rng):
  kwargs, causal, block = CASES[case]
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, dout = attention_inputs(rng, **kwargs)
  scale = 0.7 / np.sqrt(q.shape[-1])
  cast = lambda x: jnp.asarray(x, dtype)
  kernel = IMPLS[impl]
  # (The TPU kernels round block_kv up to 128, Mosaic's lane tile.)
  opts = dict(causal=causal, scale=scale, block_q=block, block_kv=block)

  out, lse = kernel.block_attention(cast(q), cast(k), cast(v), q_pos, kv_pos, q_seg, kv_seg,
                                    **opts)
  # The reference sees the same (rounded) inputs the kernel saw.
  q, k, v, dout = (np.asarray(cast(x), np.float64) for x in (q, k, v, dout))
  ref_out, ref_lse = reference.attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal=causal,
                                         scale=scale)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert not np.isnan(np.asarray(out, np.float32)).any()
  empty = np.isneginf(ref_lse)
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
  assert np.all(np.asarray(out, np.float32)[empty] == 0)
  tol = TOLERANCE[dtype]
  assert _relative_error(out, ref_out) < tol
  finite = ~empty
  assert np.abs(np.asarray(lse)[finite] - ref_lse[finite]).max() < tol * np.abs(ref_lse[finite]).max()

  grads = kernel.block_attention_bwd(cast(q), cast(k), cast(v), q_pos, kv_pos, q_seg, kv_seg,
                                     out, lse, cast(dout), **opts)
  ref_grads = reference.attention_grads(q, k, v, q_pos, kv_pos, q_seg, kv_seg, dout,
                                        causal=causal, scale=scale)
  for name, grad, ref_grad, like in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
    assert grad.shape == like.shape and grad.dtype == dtype, name
    assert _relative_error(grad, ref_grad) < tol, name


def test_causal_blocks_above_the_diagonal_are_skipped():
  """The skip table marks exactly the block pairs that hold a visible key."""
  positions = np.arange(128, dtype=np.int32)[None]
  segments = np.ones_like(positions)
  table = masking.block_table(positions, positions, segments, segments, 32, 32, causal=True)
  np.testing.assert_array_equal(np.asarray(table), np.tril(np.ones((4, 4), bool)))
  # Two documents of 64 tokens: the off-diagonal document blocks are skipped too.
  segments = (np.arange(128)[None] // 64).astype(np.int32)
  table = masking.block_table(positions % 64, positions % 64, segments, segments, 32, 32,
                              causal=False)
  expected = np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool))
  np.testing.assert_array_equal(np.asarray(table), expected)
