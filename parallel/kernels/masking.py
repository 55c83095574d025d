"""What every block-attention implementation shares: masks, self-masking padding, skip tables.

Dimension letters: core/__init__.py.

A query sees a key when their segment ids are equal, (if causal) kv_pos <= q_pos, and
(with a sliding window W > 0) kv_pos > q_pos - W, transformers' convention: the W
positions up to and including the query's own. With S sink tokens as well, keys at
positions < S (the first S of each document: positions restart per document) stay
visible to every later query (StreamingLLM). A window needs causal attention.

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


def check_window(causal, window, sinks):
  """Refuses a mask the kernels do not define (window and sinks are static ints)."""
  if window < 0 or sinks < 0:
    raise ValueError(f"window={window} and sinks={sinks} must be >= 0 (0: none)")
  if window and not causal:
    raise ValueError(f"a sliding window (window={window}) needs causal=True")
  if sinks and not window:
    raise ValueError(f"sinks={sinks} without a window: every key is visible already; set "
                     "window > 0 or sinks=0")


def window_start(q_pos, window):
  """q_pos - window without int32 overflow (INT_MIN where it would wrap): keys at
  positions above this are inside the window of a query at q_pos."""
  return jnp.where(q_pos < INT_MIN + window, INT_MIN, q_pos - window)


def visible(q_pos, kv_pos, q_seg, kv_seg, causal, window=0, sinks=0):
  """Element mask [..., L, S] from q_* [..., L] and kv_* [..., S]."""
  return visible_broadcast(q_pos[..., :, None], kv_pos[..., None, :], q_seg[..., :, None],
                           kv_seg[..., None, :], causal, window, sinks)


def visible_broadcast(q_pos, kv_pos, q_seg, kv_seg, causal, window=0, sinks=0):
  """The mask rule on arrays that already broadcast (e.g. a column of queries, a row of keys)."""
  mask = q_seg == kv_seg
  if causal:
    mask &= kv_pos <= q_pos
  if window:
    near = kv_pos > window_start(q_pos, window)
    if sinks:
      near |= kv_pos < sinks
    mask &= near
  return mask


def _ranges(values, block):
  """Min and max over the batch and each block of `block` tokens: two [L // block] arrays."""
  blocks = values.reshape(values.shape[0], -1, block)
  return blocks.min(axis=(0, 2)), blocks.max(axis=(0, 2))


SKIP, FULL, PARTIAL = 0, 1, 2  # block states: nothing visible / all visible / needs the mask


def block_states(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal, window=0, sinks=0):
  """[nq, nk] int32 (nq = L // block_q, nk = S // block_kv): SKIP, FULL or PARTIAL for q
  block i, kv block j.

  SKIP: no query of block i can see a key of block j. FULL: every query sees every key
  (one segment on both sides, causally all keys at or before all queries, and with a
  window all keys inside every query's window or all sinks), so no mask is needed.
  Inputs are padded [B, L] / [B, S] int32 arrays whose lengths are multiples of the
  blocks. With a window W, a kv block is visible only if its last key is inside the
  window of the block's first query: work is O(L·W), not O(L²).
  """
  q_ranges = [x[:, None] for x in _ranges(q_pos, block_q) + _ranges(q_seg, block_q)]
  kv_ranges = [x[None, :] for x in _ranges(kv_pos, block_kv) + _ranges(kv_seg, block_kv)]
  visible, full = range_states(q_ranges, kv_ranges, causal, window, sinks)
  return jnp.where(full, FULL, jnp.where(visible, PARTIAL, SKIP)).astype(jnp.int32)


def range_states(q_ranges, kv_ranges, causal, window=0, sinks=0):
  """(visible, full) bool arrays for groups of queries and keys known only by the ranges
  of their positions and segment ids: q_ranges and kv_ranges are (pos_lo, pos_hi,
  seg_lo, seg_hi), arrays that broadcast against each other. visible: some query may see
  some key (conservative); full: every query sees every key."""
  q_pos_lo, q_pos_hi, q_seg_lo, q_seg_hi = q_ranges
  kv_pos_lo, kv_pos_hi, kv_seg_lo, kv_seg_hi = kv_ranges
  visible = (q_seg_lo <= kv_seg_hi) & (kv_seg_lo <= q_seg_hi)
  full = (q_seg_lo == q_seg_hi) & (kv_seg_lo == kv_seg_hi) & (q_seg_lo == kv_seg_lo)
  if causal:
    visible &= kv_pos_lo <= q_pos_hi
    full &= kv_pos_hi <= q_pos_lo
  if window:
    near = kv_pos_hi > window_start(q_pos_lo, window)
    all_near = kv_pos_lo > window_start(q_pos_hi, window)
    if sinks:
      near |= kv_pos_lo < sinks
      all_near |= kv_pos_hi < sinks
    visible &= near
    full &= all_near
  return visible, full


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


def block_table(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal, window=0, sinks=0):
  """[nq, nk] bool: may q block i see anything of kv block j?"""
  return block_states(q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, causal, window,
                      sinks) != SKIP


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
