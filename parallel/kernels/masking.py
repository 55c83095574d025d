"""What every block-attention implementation shares: masks, self-masking padding, skip tables.

Dimension letters: core/__init__.py.

A query sees a key when their segment ids are equal and (if causal) kv_pos <= q_pos.

Padding masks itself: padded keys get segment id INT_MIN and position INT_MAX,
padded queries segment id INT_MAX and position INT_MIN, so no padded query sees a
key and no query sees a padded key, causal or not (real segment ids are never
INT_MIN or INT_MAX). Kernels therefore need no separate "valid length".

The skip table says, per (q block, kv block), whether any query of the one can see
any key of the other, from the ranges of their positions and segment ids over the
whole batch. It is conservative (a True block may still be fully masked), never wrong.
"""

import jax
import jax.numpy as jnp

INT_MAX = jnp.iinfo(jnp.int32).max
INT_MIN = jnp.iinfo(jnp.int32).min


def _pad(x, length, value):
  extra = length - x.shape[1]
  return x if extra == 0 else jnp.pad(x, ((0, 0), (0, extra)), constant_values=value)


def pad_tokens(q_pos, kv_pos, q_seg, kv_seg, q_len, kv_len):
  """Pads int32 positions and segment ids ([B, L] for queries, [B, S] for keys) to q_len /
  kv_len with self-masking values."""
  return (_pad(q_pos.astype(jnp.int32), q_len, INT_MIN),
          _pad(kv_pos.astype(jnp.int32), kv_len, INT_MAX),
          _pad(q_seg.astype(jnp.int32), q_len, INT_MAX),
          _pad(kv_seg.astype(jnp.int32), kv_len, INT_MIN))


def visible(q_pos, kv_pos, q_seg, kv_seg, causal):
  """Element mask [..., L, S] from q_* [..., L] and kv_* [..., S]."""
  return visible_broadcast(q_pos[..., :, None], kv_pos[..., None, :], q_seg[..., :, None],
                           kv_seg[..., None, :], causal)


def visible_broadcast(q_pos, kv_pos, q_seg, kv_seg, causal):
  """The mask rule on arrays that already broadcast (e.g. a column of queries, a row of keys)."""
  mask = q_seg == kv_seg
  if causal:
    mask &= kv_pos <= q_pos
  return mask


def _ranges(values, block):
  """Min and max over the batch and each block of `block` tokens: two [L // block] arrays."""
  blocks = values.reshape(values.shape[0], -1, block)
  return blocks.min(axis=(0, 2)), blocks.max(axis=(0, 2))


SKIP, FULL, PARTIAL = 0, 1, 2  # block states: nothing visible / all visible / needs the mask


def block_states(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal):
  """[nq, nk] int32 (nq = L // block_q, nk = S // block_kv): SKIP, FULL or PARTIAL for q
  block i, kv block j.

  SKIP: no query of block i can see a key of block j. FULL: every query sees every key
  (one segment on both sides, and causally all keys are at or before all queries), so
  no mask is needed. Inputs are padded [B, L] / [B, S] int32 arrays whose lengths are
  multiples of the blocks.
  """
  q_seg_lo, q_seg_hi = _ranges(q_seg, block_q)
  kv_seg_lo, kv_seg_hi = _ranges(kv_seg, block_kv)
  q_seg_lo, q_seg_hi = q_seg_lo[:, None], q_seg_hi[:, None]
  kv_seg_lo, kv_seg_hi = kv_seg_lo[None, :], kv_seg_hi[None, :]
  visible = (q_seg_lo <= kv_seg_hi) & (kv_seg_lo <= q_seg_hi)
  full = (q_seg_lo == q_seg_hi) & (kv_seg_lo == kv_seg_hi) & (q_seg_lo == kv_seg_lo)
  if causal:
    q_pos_lo, q_pos_hi = _ranges(q_pos, block_q)
    kv_pos_lo, kv_pos_hi = _ranges(kv_pos, block_kv)
    visible &= kv_pos_lo[None, :] <= q_pos_hi[:, None]
    full &= kv_pos_hi[None, :] <= q_pos_lo[:, None]
  return jnp.where(full, FULL, jnp.where(visible, PARTIAL, SKIP)).astype(jnp.int32)


def schedule(states):
  """Visit order for loops that must not branch: per row of a block-state table.

  Returns (order, num_full, num_visible): order[i] lists the columns of row i with the
  FULL blocks first, then the PARTIAL ones, then the skipped ones; a loop runs columns
  order[i, :num_full[i]] without a mask, order[i, num_full[i]:num_visible[i]] with it,
  and never touches the rest.
  """
  rank = jnp.where(states == FULL, 0, jnp.where(states == PARTIAL, 1, 2))
  order = jnp.argsort(rank, axis=1, stable=True).astype(jnp.int32)
  return order, (states == FULL).sum(axis=1), (states != SKIP).sum(axis=1)


def block_table(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal):
  """[nq, nk] bool: may q block i see anything of kv block j?"""
  return block_states(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal) != SKIP


def fetch_table(table):
  """[nq, nk] int32: the kv block to load at step j of q block i.

  j itself where the table is True; elsewhere the last visible block before j (or
  the first visible one, if none is before), so a kernel pipeline that only copies
  when the block index changes copies nothing for skipped steps.
  """
  steps = jnp.arange(table.shape[1], dtype=jnp.int32)
  last = jax.lax.cummax(jnp.where(table, steps, -1), axis=1)
  first = jnp.argmax(table, axis=1).astype(jnp.int32)[:, None]
  return jnp.where(last < 0, first, last)


def backward_rows(out, lse, dout):
  """Per-row inputs of every backward: (lse, delta), both [B, L, H] float32.

  delta = sum(dout * out) over the head dim (FlashAttention-2). A row that sees no key
  anywhere has lse = -inf; it becomes +inf, so that row's p = exp(s - lse) is exactly 0.
  """
  delta = jnp.einsum("blhd,blhd->blh", dout.astype(jnp.float32), out.astype(jnp.float32))
  return jnp.where(lse == -jnp.inf, jnp.inf, lse), delta
