"""Blockwise attention in plain jnp: the XLA implementation of the block contract.

Dimension letters: core/__init__.py.

This runs on every backend and is the CPU default. It is FlashAttention-2 written
with lax loops instead of a fused kernel:

  forward   for each q block (lax.map):  for each kv block (fori_loop):
              online-softmax update of (max, sum, acc) unless the block is skipped
  backward  for each kv block (lax.scan, carrying dq):  for each q block (fori_loop):
              p = exp(s - lse); dv += pᵀ·dO; ds = p·(dO·vᵀ - delta); dq += ds·k; dk += dsᵀ·q

Each (q block, kv block) pair has a state from masking.block_states: SKIP, FULL (no
mask needed) or PARTIAL (masked). The inner loops do not branch: they walk a
per-row visit order (masking.schedule) whose trip counts are runtime values, first
the FULL blocks without a mask, then the PARTIAL ones with it; skipped blocks are
never visited. (A `lax.cond`/`switch` per block costs up to a quarter of the speed
on CPU: buffers are copied in and out of the branches.)

Layout. Inputs follow the contract: q [B, L, H, D]; k, v [B, S, K, D] with
H % K == 0 (query head h reads kv head h // G, G = H // K); positions and segment
ids [B, L] / [B, S] int32; out [B, L, H, D] in q.dtype, lse [B, L, H] float32.
Inside, arrays are heads-major and the G query heads of a kv head are folded into
the rows: q becomes [B, K, L·G, D] (row r is token r // G), k and v [B, K, S, D].
A q block is then R = G·block_q rows, every block product is one plain batched
matmul per kv head ("bkrd,bksd->bkrs"), no kv head is ever repeated, and the logits
of a block pair ([B, K, R, block_kv] f32) stay small enough to live in cache, which
on CPU matters more than anything else. Lengths that are not a multiple of the block
are padded with self-masking positions and segment ids (masking.py).
"""

import jax.numpy as jnp
from jax import lax

from parallel.kernels import common, masking
from parallel.kernels.common import NEG_INF, round_up

# Default blocks: G·256 query rows against 128 keys keep a block pair's logits in cache.
BLOCK_Q, BLOCK_KV = 256, 128


class _Plan:
  """Block sizes, padding, the block-state table and the layout changes of one call."""

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv, window,
               sinks):
    masking.check_window(causal, window, sinks)
    self.batch, self.q_len_in, q_heads, self.head_dim = q.shape
    self.kv_len_in, self.kv_heads = k.shape[1], k.shape[2]
    self.group = q_heads // self.kv_heads
    self.block_q = min(block_q, self.q_len_in)
    self.block_kv = min(block_kv, self.kv_len_in)
    self.q_len = round_up(self.q_len_in, self.block_q)
    self.kv_len = round_up(self.kv_len_in, self.block_kv)
    self.num_q, self.num_kv = self.q_len // self.block_q, self.kv_len // self.block_kv
    self.causal, self.window, self.sinks = causal, window, sinks
    self.q_pos, self.kv_pos, self.q_seg, self.kv_seg = masking.pad_tokens(
        q_pos, kv_pos, q_seg, kv_seg, self.q_len, self.kv_len)
    self.states = masking.block_states(self.q_pos, self.kv_pos, self.q_seg, self.kv_seg,
                                       self.block_q, self.block_kv, causal, window, sinks)

  def _pad(self, x, length, value=0):
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)

  def q_rows(self, x, value=0):
    """[B, L, H, ...] -> [B, K, L·G, ...], padded (value) to whole blocks."""
    x = self._pad(x, self.q_len, value)
    tail = x.shape[3:]
    x = x.reshape(self.batch, self.q_len, self.kv_heads, self.group, *tail)
    x = jnp.moveaxis(x, 2, 1)  # [B, K, L, G, ...]
    return x.reshape(self.batch, self.kv_heads, self.q_len * self.group, *tail)

  def from_q_rows(self, x):
    """Inverse of q_rows, padding removed."""
    tail = x.shape[3:]
    x = x.reshape(self.batch, self.kv_heads, self.q_len, self.group, *tail)
    x = jnp.moveaxis(x, 1, 2)  # [B, L, K, G, ...]
    x = x.reshape(self.batch, self.q_len, self.kv_heads * self.group, *tail)
    return x[:, :self.q_len_in]

  def kv_rows(self, x):
    """[B, S, K, D] -> [B, K, S, D], padded to whole blocks."""
    return self._pad(x, self.kv_len).transpose(0, 2, 1, 3)

  def q_block(self, x, i):
    """The R rows of q block i from a q_rows array (axis 2)."""
    rows = self.block_q * self.group
    return lax.dynamic_slice_in_dim(x, i * rows, rows, axis=2)

  def kv_block(self, x, j):
    """Keys of kv block j from a kv_rows array (axis 2)."""
    return lax.dynamic_slice_in_dim(x, j * self.block_kv, self.block_kv, axis=2)

  def mask(self, i, j):
    """[B, bq, bk] visibility of q block i and kv block j."""
    token_block = lambda x, n, size: lax.dynamic_slice_in_dim(x, n * size, size, axis=1)
    return masking.visible(token_block(self.q_pos, i, self.block_q),
                           token_block(self.kv_pos, j, self.block_kv),
                           token_block(self.q_seg, i, self.block_q),
                           token_block(self.kv_seg, j, self.block_kv), self.causal,
                           self.window, self.sinks)

  def logits(self, q_blk, k_blk, i, j, scale, masked, keys_first=False):
    """Block-pair logits in float32, -inf where masked: [B, K, R, bk], or with
    keys_first [B, K, bk, R] (the backward's layout)."""
    if keys_first:
      logits = jnp.einsum("bksd,bkrd->bksr", k_blk, q_blk, preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("bkrd,bksd->bkrs", q_blk, k_blk, preferred_element_type=jnp.float32)
    logits = logits * scale
    if not masked:
      return logits
    mask = self.mask(i, j)  # [B, bq, bk]; row r of a block is token r // G
    batch, heads, bq, bk, group = self.batch, self.kv_heads, self.block_q, self.block_kv, self.group
    if keys_first:  # [B, K, bk, R] -> [B, K, bk, bq, G]
      view, mask = (batch, heads, bk, bq, group), jnp.swapaxes(mask, 1, 2)[:, None, :, :, None]
    else:           # [B, K, R, bk] -> [B, K, bq, G, bk]
      view, mask = (batch, heads, bq, group, bk), mask[:, None, :, None, :]
    return jnp.where(mask, logits.reshape(view), NEG_INF).reshape(logits.shape)

  def visit(self, schedule, row, update, carry):
    """carry = update(column, carry, masked) over the visible blocks of `row`, unmasked first."""
    order, num_full, num_visible = schedule
    unmasked = lambda t, c: update(order[row, t], c, masked=False)
    masked = lambda t, c: update(order[row, t], c, masked=True)
    carry = lax.fori_loop(0, num_full[row], unmasked, carry)
    return lax.fori_loop(num_full[row], num_visible[row], masked, carry)


@common.kernel_jit()
def block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale, block_q=BLOCK_Q,
                    block_kv=BLOCK_KV, window=0, sinks=0):
  """Attention of q over one block of keys. Returns (out, lse); see the module docstring.
  window / sinks: the sliding window and its sink tokens (masking.py; 0: none)."""
  plan = _Plan(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv, window, sinks)
  q_rows, k_rows, v_rows = plan.q_rows(q), plan.kv_rows(k), plan.kv_rows(v)

  schedule = masking.schedule(plan.states)

  def one_q_block(i):
    q_blk = plan.q_block(q_rows, i)

    def update(j, carry, masked):
      row_max, row_sum, acc = carry
      logits = plan.logits(q_blk, plan.kv_block(k_rows, j), i, j, scale, masked)
      new_max, row_sum, probs, correction = common.softmax_update(row_max, row_sum, logits)
      acc = acc * correction + jnp.einsum(
          "bkrs,bksd->bkrd", probs.astype(v.dtype), plan.kv_block(v_rows, j),
          preferred_element_type=jnp.float32)
      return new_max, row_sum, acc

    stats_shape = q_blk.shape[:3]
    init = (jnp.full(stats_shape, NEG_INF, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(q_blk.shape, jnp.float32))
    row_max, row_sum, acc = plan.visit(schedule, i, update, init)
    out, lse = common.softmax_finish(acc, row_max, row_sum)
    return out.astype(q.dtype), lse

  out, lse = lax.map(one_q_block, jnp.arange(plan.num_q))
  # [nq, B, K, R, ...] -> [B, K, L·G, ...] -> [B, L, H, ...]
  out = jnp.moveaxis(out, 0, 2).reshape(q_rows.shape)
  lse = jnp.moveaxis(lse, 0, 2).reshape(q_rows.shape[:3])
  return plan.from_q_rows(out), plan.from_q_rows(lse)


@common.kernel_jit()
def block_attention_bwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, *, causal,
                        scale, block_q=BLOCK_Q, block_kv=BLOCK_KV, window=0, sinks=0):
  """Gradients (dq, dk, dv) of this block's share of the loss.

  `out` and `lse` [B, L, H] are the *final* attention output and log-sum-exp of
  the query rows (over all key blocks, e.g. the whole ring), so p = exp(s - lse) is
  each key's exact share and the per-block gradients add up. dout is [B, L, H, D].
  """
  plan = _Plan(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv, window, sinks)
  lse, delta = masking.backward_rows(out, lse, dout)  # padding rows get lse = +inf too
  q_rows, dout_rows = plan.q_rows(q), plan.q_rows(dout)
  lse_rows, delta_rows = plan.q_rows(lse, jnp.inf), plan.q_rows(delta)  # [B, K, L·G]
  k_rows, v_rows = plan.kv_rows(k), plan.kv_rows(v)

  schedule = masking.schedule(plan.states.T)

  def one_kv_block(dq, j):
    k_blk, v_blk = plan.kv_block(k_rows, j), plan.kv_block(v_rows, j)

    def update(i, carry, masked):
      dq, dk_blk, dv_blk = carry
      q_blk, dout_blk = plan.q_block(q_rows, i), plan.q_block(dout_rows, i)
      lse_blk = plan.q_block(lse_rows, i)[..., None, :]
      delta_blk = plan.q_block(delta_rows, i)[..., None, :]
      # Keys along rows ([B, K, bk, R]) so three of the four products are plain
      # (not transposed) matmuls.
      probs = jnp.exp(plan.logits(q_blk, k_blk, i, j, scale, masked, keys_first=True) - lse_blk)
      dv_blk += jnp.einsum("bksr,bkrd->bksd", probs.astype(dout.dtype), dout_blk,
                           preferred_element_type=jnp.float32)
      dprobs = jnp.einsum("bksd,bkrd->bksr", v_blk, dout_blk,
                          preferred_element_type=jnp.float32)
      dlogits = (probs * (dprobs - delta_blk) * scale).astype(q.dtype)
      dk_blk += jnp.einsum("bksr,bkrd->bksd", dlogits, q_blk,
                           preferred_element_type=jnp.float32)
      dq_blk = jnp.einsum("bksr,bksd->bkrd", dlogits, k_blk,
                          preferred_element_type=jnp.float32)
      rows = plan.block_q * plan.group
      dq = lax.dynamic_update_slice_in_dim(
          dq, lax.dynamic_slice_in_dim(dq, i * rows, rows, 2) + dq_blk, i * rows, 2)
      return dq, dk_blk, dv_blk

    init = (dq, jnp.zeros(k_blk.shape, jnp.float32), jnp.zeros(v_blk.shape, jnp.float32))
    dq, dk_blk, dv_blk = plan.visit(schedule, j, update, init)
    return dq, (dk_blk, dv_blk)

  dq, (dk, dv) = lax.scan(one_kv_block, jnp.zeros(q_rows.shape, jnp.float32),
                          jnp.arange(plan.num_kv))
  # [nk, B, K, bk, D] -> [B, S, K, D]
  from_blocks = lambda x: jnp.moveaxis(x, 0, 2).reshape(k_rows.shape).transpose(0, 2, 1, 3)
  dk, dv = from_blocks(dk)[:, :plan.kv_len_in], from_blocks(dv)[:, :plan.kv_len_in]
  return plan.from_q_rows(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
