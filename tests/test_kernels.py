"""Every block-attention implementation against the float64 reference, forward and backward."""

import jax.numpy as jnp
import numpy as np
import pytest

from parallel.kernels import masking, pallas_gpu, pallas_tpu, reference, xla
from tests.inputs import attention_inputs

IMPLS = {"xla": xla, "pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}

# name -> (attention_inputs kwargs, causal, block size[, sliding window, sink tokens])
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
    # sliding windows (masking.py): a query sees only itself
    "window-1": (dict(q_len=64, q_heads=4, kv_heads=2), True, 16, 1, 0),
    # a window that is no multiple of the block, with sinks, packed, ragged, GQA
    "window-ragged-sinks": (dict(q_len=100, kv_len=70, q_heads=8, kv_heads=2, doc_len=45),
                            True, 32, 23, 4),
    # a window longer than the row: the same as no window
    "window-longer-than-row": (dict(q_len=64, doc_len=40), True, 16, 200, 0),
    # keys later than the queries (a ring step): early rows see nothing
    "window-rows-without-keys": (dict(q_len=64, kv_len=48, kv_offset=20), True, 16, 30, 2),
    # several 128-key blocks, most outside the window (the TPU kernels skip them)
    "window-long-packed": (dict(batch=1, q_len=300, q_heads=4, kv_heads=1, doc_len=250),
                           True, 64, 70, 0),
    "window-long-sinks": (dict(batch=1, q_len=300, q_heads=4, kv_heads=1), True, 64, 50, 3),
}

TOLERANCE = {np.float32: 1e-5, jnp.bfloat16: 2e-2}


def _relative_error(actual, expected):
  """Max error relative to the largest expected value; absolute where everything expected
  is 0 (a window of 1: each row's only weight is 1, so dq = dk = 0 exactly)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  largest = np.abs(expected).max()
  return np.abs(actual - expected).max() / (largest if largest > 0 else 1.0)


def _params():
  """Every (impl, case, dtype); the windowed bf16 cases of the interpreted Pallas kernels
  run with `-m slow` (their f32 twins and the XLA kernel's run by default)."""
  for impl in IMPLS:
    for case in CASES:
      for dtype, name in ((np.float32, "f32"), (jnp.bfloat16, "bf16")):
        slow = case.startswith("window") and impl != "xla" and name == "bf16"
        yield pytest.param(impl, case, dtype, id=f"{impl}-{case}-{name}",
                           marks=pytest.mark.slow if slow else ())


@pytest.mark.parametrize("impl,case,dtype", list(_params()))
def test_block_attention_matches_reference(impl, case, dtype, rng):
  kwargs, causal, block, window, sinks = (CASES[case] + (0, 0))[:5]
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, dout = attention_inputs(rng, **kwargs)
  scale = 0.7 / np.sqrt(q.shape[-1])
  cast = lambda x: jnp.asarray(x, dtype)
  kernel = IMPLS[impl]
  # (The TPU kernels round block_kv up to 128, Mosaic's lane tile.)
  opts = dict(causal=causal, scale=scale, block_q=block, block_kv=block, window=window,
              sinks=sinks)

  out, lse = kernel.block_attention(cast(q), cast(k), cast(v), q_pos, kv_pos, q_seg, kv_seg,
                                    **opts)
  # The reference sees the same (rounded) inputs the kernel saw.
  q, k, v, dout = (np.asarray(cast(x), np.float64) for x in (q, k, v, dout))
  ref_out, ref_lse = reference.attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal=causal,
                                         scale=scale, window=window, sinks=sinks)
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
                                        causal=causal, scale=scale, window=window,
                                        sinks=sinks)
  for name, grad, ref_grad, like in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
    assert grad.shape == like.shape and grad.dtype == dtype, name
    assert _relative_error(grad, ref_grad) < tol, name


@pytest.mark.parametrize("case", ["long-packed-gqa", "ragged-lengths", "window-long-sinks"])
def test_tpu_kernels_split_a_table_too_large_for_smem(case, rng):
  """A skip table over `table_entries` splits the call into spans (query spans for the
  forward and dQ, key spans for dK/dV; pallas_tpu's docstring): the same results as the
  one call and the float64 reference. Here at most 4 entries a call: 5 x 3 blocks of
  "long-packed-gqa" become 5 forward and dQ calls and 3 dK/dV calls."""
  kwargs, causal, block, window, sinks = (CASES[case] + (0, 0))[:5]
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, dout = attention_inputs(rng, **kwargs)
  scale = 0.7 / np.sqrt(q.shape[-1])
  opts = dict(causal=causal, scale=scale, block_q=block, block_kv=block, window=window,
              sinks=sinks)
  tokens = (q_pos, kv_pos, q_seg, kv_seg)
  out, lse = pallas_tpu.block_attention(q, k, v, *tokens, **opts, table_entries=4)
  whole_out, whole_lse = pallas_tpu.block_attention(q, k, v, *tokens, **opts)
  np.testing.assert_allclose(out, whole_out, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lse, whole_lse, rtol=1e-6, atol=1e-6)
  ref_out, _ = reference.attention(q, k, v, *tokens, causal=causal, scale=scale,
                                   window=window, sinks=sinks)
  assert _relative_error(out, ref_out) < TOLERANCE[np.float32]
  grads = pallas_tpu.block_attention_bwd(q, k, v, *tokens, out, lse, dout, **opts,
                                         table_entries=4)
  ref_grads = reference.attention_grads(q, k, v, *tokens, dout, causal=causal, scale=scale,
                                        window=window, sinks=sinks)
  for name, grad, ref_grad, like in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
    assert grad.shape == like.shape, name
    assert _relative_error(grad, ref_grad) < TOLERANCE[np.float32], name


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


def _brute_force_states(q_pos, kv_pos, q_seg, kv_seg, block, causal, window, sinks):
  """[nq, nk] SKIP / FULL / PARTIAL from the element mask itself."""
  mask = np.asarray(masking.visible(q_pos, kv_pos, q_seg, kv_seg, causal, window, sinks))
  blocks = mask.reshape(mask.shape[0], mask.shape[1] // block, block, -1, block)
  any_seen, all_seen = blocks.any(axis=(0, 2, 4)), blocks.all(axis=(0, 2, 4))
  return np.where(all_seen, masking.FULL, np.where(any_seen, masking.PARTIAL, masking.SKIP))


@pytest.mark.parametrize("window,sinks", [(1, 0), (20, 0), (32, 0), (50, 5), (1000, 0)])
def test_window_block_states(window, sinks, rng):
  """Natural order, one document: the block states are exactly the element mask's (so a
  window of W costs ~L·W, not L²); in any order and packed they are never wrong."""
  positions = np.arange(256, dtype=np.int32)[None]
  segments = np.ones_like(positions)
  states = masking.block_states(positions, positions, segments, segments, 16, 16, True,
                                window, sinks)
  expected = _brute_force_states(positions, positions, segments, segments, 16, True, window,
                                 sinks)
  np.testing.assert_array_equal(np.asarray(states), expected)
  if window <= 32 and not sinks:  # the work grows with the window, not the length
    assert (expected != masking.SKIP).sum(axis=1).max() <= window // 16 + 2
  # Shuffled, packed, padded: conservative (a SKIP is never visible, a FULL always is).
  order = rng.permutation(256)
  q_pos, q_seg, kv_pos, kv_seg = masking.pad_tokens(
      positions[:, order] % 100, positions[:, order] % 100, positions[:, order] // 100,
      positions[:, order] // 100, 272, 272)
  states = np.asarray(masking.block_states(q_pos, kv_pos, q_seg, kv_seg, 16, 16, True, window,
                                           sinks))
  exact = _brute_force_states(q_pos, kv_pos, q_seg, kv_seg, 16, True, window, sinks)
  assert not ((states == masking.SKIP) & (exact != masking.SKIP)).any()
  assert not ((states == masking.FULL) & (exact != masking.FULL)).any()


def test_window_refused_without_causal():
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, _ = attention_inputs(np.random.default_rng(0))
  with pytest.raises(ValueError, match="needs causal"):
    xla.block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal=False, scale=0.1,
                        window=8)
  with pytest.raises(ValueError, match="sinks=2 without a window"):
    xla.block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal=True, scale=0.1,
                        sinks=2)
