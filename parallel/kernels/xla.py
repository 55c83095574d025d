"""Blockwise attention in plain jnp: the XLA implementation of the block contract.

This runs on every backend and is the CPU default. It is FlashAttention-2 written
with lax loops instead of a fused kernel:

  forward   for each q block (lax.map):  for each kv block (fori_loop):
              if visible(q block, kv block): online-softmax update of (m, l, acc)
  backward  for each kv block (lax.scan, carrying dq):  for each q block (fori_loop):
              if visible: p = exp(s - lse); dv += pᵀ·dO; ds = p·(dO·vᵀ - delta);
                          dq += ds·k; dk += dsᵀ·q

`visible` is decided per (q block, kv block) from the ranges of their positions and
segment ids (a `lax.cond` on runtime values), so fully masked blocks cost nothing.

Shapes (per device, the arrays a ring step holds):
  q [B, Lq, Hq, D]; k, v [B, Lk, Hkv, D] with Hq % Hkv == 0 (query head h reads
  kv head h // (Hq // Hkv)); q_pos, q_seg [B, Lq]; kv_pos, kv_seg [B, Lk] int32.
  out [B, Lq, Hq, D] in q.dtype; lse [B, Lq, Hq] float32.
Internally q is viewed as [B, L, Hkv, G, D] (a free reshape), so kv heads are
never repeated. Lengths that are not a multiple of the block size are padded
inside with self-masking positions and segment ids (parallel/kernels/masking.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from parallel.kernels import masking

NEG_INF = -jnp.inf


def _pad_to(x, length, axis, value=0):
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


class _Blocks:
  """The padded, blocked view of one call's tokens and the per-block skip table."""

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv):
    q_len, kv_len = q.shape[1], k.shape[1]
    self.group = q.shape[2] // k.shape[2]
    self.block_q = min(block_q, q_len)
    self.block_kv = min(block_kv, kv_len)
    self.num_q = -(-q_len // self.block_q)
    self.num_kv = -(-kv_len // self.block_kv)
    self.q_len_padded = self.num_q * self.block_q
    self.kv_len_padded = self.num_kv * self.block_kv
    self.causal = causal
    self.q_pos, self.kv_pos, self.q_seg, self.kv_seg = masking.pad_tokens(
        q_pos, kv_pos, q_seg, kv_seg, self.q_len_padded, self.kv_len_padded)
    # visible[i, j]: q block i may see some key of kv block j.
    self.visible = masking.block_table(self.q_pos, self.kv_pos, self.q_seg, self.kv_seg,
                                       self.block_q, self.block_kv, causal)

  def q_block(self, x, i):
    return lax.dynamic_slice_in_dim(x, i * self.block_q, self.block_q, axis=1)

  def kv_block(self, x, j):
    return lax.dynamic_slice_in_dim(x, j * self.block_kv, self.block_kv, axis=1)

  def mask(self, i, j):
    """[B, 1, 1, bq, bk]: which (query, key) pairs of blocks (i, j) are visible."""
    mask = masking.visible(self.q_block(self.q_pos, i), self.kv_block(self.kv_pos, j),
                           self.q_block(self.q_seg, i), self.kv_block(self.kv_seg, j),
                           self.causal)
    return mask[:, None, None]


def _logits(q_blk, k_blk, mask, scale):
  """q_blk [B, bq, Hkv, G, D], k_blk [B, bk, Hkv, D] -> masked logits [B, Hkv, G, bq, bk] f32."""
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k_blk,
                      preferred_element_type=jnp.float32) * scale
  return jnp.where(mask, logits, NEG_INF)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv"))
def block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale,
                    block_q=512, block_kv=512):
  """Attention of q over one block of keys. Returns (out, lse); see the module docstring."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  blocks = _Blocks(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv)
  group = blocks.group
  # [B, Lq, Hq, D] -> [B, Lq, Hkv, G, D]
  q5 = _pad_to(q, blocks.q_len_padded, 1).reshape(batch, -1, kv_heads, group, head_dim)
  k = _pad_to(k, blocks.kv_len_padded, 1)
  v = _pad_to(v, blocks.kv_len_padded, 1)

  def one_q_block(i):
    q_blk = blocks.q_block(q5, i)

    def kv_step(j, carry):
      def update(carry):
        row_max, row_sum, acc = carry
        mask = blocks.mask(i, j)
        logits = _logits(q_blk, blocks.kv_block(k, j), mask, scale)
        new_max = jnp.maximum(row_max, logits.max(-1))
        safe_max = jnp.where(new_max == NEG_INF, 0.0, new_max)  # no NaN for empty rows
        probs = jnp.exp(logits - safe_max[..., None])
        correction = jnp.exp(row_max - safe_max)
        row_sum = row_sum * correction + probs.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "bhgqk,bkhd->bhgqd", probs.astype(v.dtype), blocks.kv_block(v, j),
            preferred_element_type=jnp.float32)
        return new_max, row_sum, acc

      return lax.cond(blocks.visible[i, j], update, lambda c: c, carry)

    stats_shape = (batch, kv_heads, group, blocks.block_q)
    init = (jnp.full(stats_shape, NEG_INF, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(stats_shape + (head_dim,), jnp.float32))
    row_max, row_sum, acc = lax.fori_loop(0, blocks.num_kv, kv_step, init)
    out = acc / jnp.where(row_sum == 0, 1.0, row_sum)[..., None]
    lse = jnp.where(row_sum == 0, NEG_INF, row_max + jnp.log(jnp.where(row_sum == 0, 1.0, row_sum)))
    return out.astype(q.dtype), lse

  out, lse = lax.map(one_q_block, jnp.arange(blocks.num_q))
  # [nq, B, Hkv, G, bq, D] -> [B, nq * bq, Hkv * G, D]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, blocks.q_len_padded, q_heads, head_dim)
  lse = lse.transpose(1, 0, 4, 2, 3).reshape(batch, blocks.q_len_padded, q_heads)
  return out[:, :q_len], lse[:, :q_len]


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv"))
def block_attention_bwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, *, causal,
                        scale, block_q=512, block_kv=512):
  """Gradients (dq, dk, dv) of this block's share of the loss.

  `out` and `lse` [B, Lq, Hq] are the *final* attention output and log-sum-exp of
  the query rows (over all key blocks, e.g. the whole ring), so p = exp(s - lse) is
  each key's exact share and the per-block gradients add up. dout is [B, Lq, Hq, D].
  """
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  blocks = _Blocks(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv)
  group = blocks.group

  def grouped(x, pad_value=0):  # [B, Lq, Hq, ...] -> padded [B, Lq, Hkv, G, ...]
    x = _pad_to(x, blocks.q_len_padded, 1, pad_value)
    return x.reshape(batch, blocks.q_len_padded, kv_heads, group, *x.shape[3:])

  delta = jnp.einsum("bqhd,bqhd->bqh", dout.astype(jnp.float32), out.astype(jnp.float32))
  # A row with no visible key anywhere has lse = -inf; +inf makes its p exactly 0.
  lse = jnp.where(lse == NEG_INF, jnp.inf, lse)
  q5, dout5 = grouped(q), grouped(dout)
  lse4, delta4 = grouped(lse, jnp.inf), grouped(delta)  # [B, Lq, Hkv, G]
  k = _pad_to(k, blocks.kv_len_padded, 1)
  v = _pad_to(v, blocks.kv_len_padded, 1)

  def one_kv_block(dq, j):
    k_blk, v_blk = blocks.kv_block(k, j), blocks.kv_block(v, j)

    def q_step(i, carry):
      def update(carry):
        dq, dk_blk, dv_blk = carry
        q_blk, dout_blk = blocks.q_block(q5, i), blocks.q_block(dout5, i)
        # [B, bq, Hkv, G] -> [B, Hkv, G, bq, 1]
        lse_blk = blocks.q_block(lse4, i).transpose(0, 2, 3, 1)[..., None]
        delta_blk = blocks.q_block(delta4, i).transpose(0, 2, 3, 1)[..., None]
        probs = jnp.exp(_logits(q_blk, k_blk, blocks.mask(i, j), scale) - lse_blk)
        dv_blk += jnp.einsum("bhgqk,bqhgd->bkhd", probs.astype(dout.dtype), dout_blk,
                             preferred_element_type=jnp.float32)
        dprobs = jnp.einsum("bqhgd,bkhd->bhgqk", dout_blk, v_blk,
                            preferred_element_type=jnp.float32)
        dlogits = (probs * (dprobs - delta_blk) * scale).astype(q.dtype)
        dk_blk += jnp.einsum("bhgqk,bqhgd->bkhd", dlogits, q_blk,
                             preferred_element_type=jnp.float32)
        dq_blk = jnp.einsum("bhgqk,bkhd->bqhgd", dlogits, k_blk,
                            preferred_element_type=jnp.float32)
        start = i * blocks.block_q
        dq = lax.dynamic_update_slice_in_dim(
            dq, lax.dynamic_slice_in_dim(dq, start, blocks.block_q, 1) + dq_blk, start, 1)
        return dq, dk_blk, dv_blk

      return lax.cond(blocks.visible[i, j], update, lambda c: c, carry)

    kv_shape = (batch, blocks.block_kv, kv_heads, head_dim)
    init = (dq, jnp.zeros(kv_shape, jnp.float32), jnp.zeros(kv_shape, jnp.float32))
    dq, dk_blk, dv_blk = lax.fori_loop(0, blocks.num_q, q_step, init)
    return dq, (dk_blk, dv_blk)

  dq0 = jnp.zeros((batch, blocks.q_len_padded, kv_heads, group, head_dim), jnp.float32)
  dq, (dk, dv) = lax.scan(one_kv_block, dq0, jnp.arange(blocks.num_kv))
  # [nk, B, bk, Hkv, D] -> [B, nk * bk, Hkv, D]
  dk = dk.transpose(1, 0, 2, 3, 4).reshape(batch, blocks.kv_len_padded, kv_heads, head_dim)
  dv = dv.transpose(1, 0, 2, 3, 4).reshape(batch, blocks.kv_len_padded, kv_heads, head_dim)
  dq = dq.reshape(batch, blocks.q_len_padded, q_heads, head_dim)
  return (dq[:, :q_len].astype(q.dtype), dk[:, :kv_len].astype(k.dtype),
          dv[:, :kv_len].astype(v.dtype))
