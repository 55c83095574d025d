"""Block attention as Pallas GPU kernels (Triton backend): forward, dK/dV and dQ.

Dimension letters: core/__init__.py.

Same contract as `xla.py`: q [B, L, H, D], k/v [B, S, K, D], positions and segment
ids [B, L] / [B, S] int32 -> out [B, L, H, D], lse [B, L, H] f32; the backward takes
the final (out, lse) and dout. On CPU the kernels run in interpret mode.

Triton has no scalar prefetch and no scratch buffers, so each program keeps its
block in registers and walks the other side with a `fori_loop`; a row of the skip
table (masking.block_table, a plain input) gates each step with `lax.cond`, so
fully masked blocks are neither loaded nor computed. Arrays stay in the caller's
[B, L, H, D] layout (Triton loads strided tiles); lengths are padded to whole blocks
with self-masking values (masking.py). Triton tiles must be powers of two: block_q,
block_kv and head_dim.

Grids and BlockSpecs (G = H // K; query head h reads kv head h // G). Grid indices
are b, h (query head), k (kv head), i (q block), j (kv block); the index maps below
name each block's place:

  forward  grid (B, H, nq)
    q, out      (bq, D)      at (b, i, h)       in registers
    k, v        (S, D)       at (b, 0, h // G)  whole sequence; the loop loads (bk, D) tiles
    table row   (nk,)        at (i)
    lse         (bq,)        at (b, h, i)
  dK/dV    grid (B, K, nk)
    k, v, dk, dv (bk, D)     at (b, j, k)       in registers
    q, dout     (L, G, D)    at (b, 0, k)       the group's G query heads; the loop loads (bq, D)
    lse, delta  (G, L)       at (b, k, 0);      table row (nq,) at (j)
  dQ       grid (B, H, nq), like the forward
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from parallel.kernels import common, masking
from parallel.kernels.common import NEG_INF, dot, round_up

BLOCK_Q, BLOCK_KV = 64, 64


def _power_of_two(x):
  return x > 0 and x & (x - 1) == 0


class _Plan:
  """Block sizes, padded lengths, skip tables and padded tokens of one call."""

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, rule, block_q, block_kv):
    masking.check_window(*rule)
    q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if not (_power_of_two(block_q) and _power_of_two(block_kv) and _power_of_two(head_dim)):
      raise ValueError(f"attention.block_q={block_q}, attention.block_kv={block_kv} and the head "
                       f"dim {head_dim} must be powers of two for the Triton kernels")
    self.group = q.shape[2] // k.shape[2]
    self.block_q = min(block_q, pl.next_power_of_2(q_len))
    self.block_kv = min(block_kv, pl.next_power_of_2(kv_len))
    self.q_len, self.kv_len = round_up(q_len, self.block_q), round_up(kv_len, self.block_kv)
    self.num_q, self.num_kv = self.q_len // self.block_q, self.kv_len // self.block_kv
    self.tokens = masking.pad_tokens(q_pos, kv_pos, q_seg, kv_seg, self.q_len, self.kv_len)
    table = masking.block_table(*self.tokens, self.block_q, self.block_kv, *rule)
    # Rows are loaded whole, so their length is padded to a power of two (with False).
    pad = lambda t: jnp.pad(t, ((0, 0), (0, pl.next_power_of_2(t.shape[1]) - t.shape[1])))
    self.table_by_q = pad(table.astype(jnp.int32))      # [nq, nk']
    self.table_by_kv = pad(table.T.astype(jnp.int32))   # [nk, nq']

  def pad(self, x, length):
    """Zero-pads axis 1 of x to `length`."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

  def query_grid_specs(self, head_dim):
    """The BlockSpecs of the (B, H, nq) grid of the forward and dQ: (table row, q-like
    tile (bq, D), whole k or v (S, D), row statistics (bq,), the four token arrays)."""
    q_tokens = pl.BlockSpec((None, self.block_q), _tile_at)
    kv_tokens = pl.BlockSpec((None, self.kv_len), _whole_at)
    return (pl.BlockSpec((None, self.table_by_q.shape[1]), _table_row_at),
            pl.BlockSpec((None, self.block_q, None, head_dim), _head_tile_at),
            pl.BlockSpec((None, self.kv_len, None, head_dim), _kv_head_of(self.group)),
            pl.BlockSpec((None, None, self.block_q), _rows_at),
            [q_tokens, q_tokens, kv_tokens, kv_tokens])


# --------------------------------------------------------------------------- index maps
# Grids (b, h, i) over (B, H, nq) for the forward and dQ, (b, k, j) over (B, K, nk) for
# dK/dV: `n` is the grid's own block (i or j), `head` its head (h or k).

def _table_row_at(b, head, n):
  """The skip-table row of block n."""
  return (n, 0)


def _head_tile_at(b, head, n):
  """Tile n of a [B, L, H, D] or [B, S, K, D] array, at the grid's own head."""
  return (b, n, head, 0)


def _tile_at(b, head, n):
  """Tokens of block n."""
  return (b, n)


def _whole_at(b, head, n):
  """All tokens of the other side."""
  return (b, 0)


def _rows_at(b, h, i):
  """lse, delta (and the forward's lse output) of query head h, q block i: [B, H, L]."""
  return (b, h, i)


def _kv_head_of(group):
  """The whole k or v of the kv head of query head h."""
  return lambda b, h, i: (b, 0, lax.div(h, group), 0)


def _group_at(b, k, j):
  """The whole q or dout of kv head k's G query heads (block (L, G, D))."""
  return (b, 0, k, 0)


def _group_rows_at(b, k, j):
  """lse, delta of kv head k's G query heads (block (G, L))."""
  return (b, k, 0)


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=common.interpret_mode(interpret), name=name)


def _skippable_loop(table_ref, count, update, carry):
  """for step in range(count): carry = update(step, carry) where table_ref[step] != 0."""
  def body(step, carry):
    return lax.cond(table_ref[step] != 0, functools.partial(update, step), lambda c: c, carry)
  return lax.fori_loop(0, count, body, carry)


# --------------------------------------------------------------------------- forward

def _forward_kernel(table_ref, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref,
                    out_ref, lse_ref, *, rule, scale, block_kv, num_kv):
  q = q_ref[...]
  q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]

  def update(j, carry):
    acc, row_max, row_sum = carry
    span = pl.ds(j * block_kv, block_kv)
    mask = masking.visible_broadcast(q_pos, kv_pos_ref[span][None, :], q_seg,
                                     kv_seg_ref[span][None, :], *rule)
    logits = jnp.where(mask, dot(q, k_ref[span, :], 1, 1) * scale, NEG_INF)
    new_max, row_sum, probs, correction = common.softmax_update(row_max, row_sum, logits)
    v = v_ref[span, :]
    return correction * acc + dot(probs.astype(v.dtype), v, 1, 0), new_max, row_sum

  rows = q.shape[0]
  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  out, lse = common.softmax_finish(*_skippable_loop(table_ref, num_kv, update, init))
  out_ref[...] = out.astype(out_ref.dtype)
  lse_ref[...] = lse


@common.kernel_jit("interpret")
def block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale, block_q=BLOCK_Q,
                    block_kv=BLOCK_KV, window=0, sinks=0, interpret=None):
  """Forward; see the module docstring. window / sinks: the sliding window (masking.py;
  0: none). interpret=None: interpret mode on CPU only."""
  batch, q_len, q_heads, head_dim = q.shape
  rule = (causal, window, sinks)
  plan = _Plan(q, k, q_pos, kv_pos, q_seg, kv_seg, rule, block_q, block_kv)
  q_pos, kv_pos, q_seg, kv_seg = plan.tokens
  table_spec, q_spec, kv_spec, rows_spec, token_specs = plan.query_grid_specs(head_dim)
  out_shape = [jax.ShapeDtypeStruct((batch, plan.q_len, q_heads, head_dim), q.dtype),
               jax.ShapeDtypeStruct((batch, q_heads, plan.q_len), jnp.float32)]
  kernel = functools.partial(_forward_kernel, rule=rule, scale=scale,
                             block_kv=plan.block_kv, num_kv=plan.num_kv)
  out, lse = _call(kernel, (batch, q_heads, plan.num_q),
                   [table_spec, q_spec, kv_spec, kv_spec, *token_specs], [q_spec, rows_spec],
                   out_shape, interpret, "ringlm_attention_fwd")(
      plan.table_by_q, plan.pad(q, plan.q_len), plan.pad(k, plan.kv_len),
      plan.pad(v, plan.kv_len), q_pos, q_seg, kv_pos, kv_seg)
  return out[:, :q_len], lse.transpose(0, 2, 1)[:, :q_len]


# --------------------------------------------------------------------------- backward

def _dkv_kernel(table_ref, q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, q_pos_ref,
                q_seg_ref, kv_pos_ref, kv_seg_ref, dk_ref, dv_ref, *, rule, scale, block_q,
                num_q, group):
  k, v = k_ref[...], v_ref[...]
  kv_pos, kv_seg = kv_pos_ref[...][None, :], kv_seg_ref[...][None, :]
  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  for g in range(group):  # the query heads that share this kv head

    def update(i, carry, g=g):
      dk, dv = carry
      span = pl.ds(i * block_q, block_q)
      q, dout = q_ref[span, g, :], dout_ref[span, g, :]
      mask = masking.visible_broadcast(q_pos_ref[span][:, None], kv_pos,
                                       q_seg_ref[span][:, None], kv_seg, *rule)
      probs, dlogits = common.probs_and_dlogits(q, k, v, dout, lse_ref[g, span],
                                                delta_ref[g, span], mask, scale)
      dv += dot(probs.astype(dout.dtype), dout, 0, 0)  # pᵀ·dout: (bk, D)
      dk += dot(dlogits.astype(q.dtype), q, 0, 0)      # dsᵀ·q: (bk, D)
      return dk, dv

    carry = _skippable_loop(table_ref, num_q, update, carry)
  dk_ref[...] = carry[0].astype(dk_ref.dtype)
  dv_ref[...] = carry[1].astype(dv_ref.dtype)


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, q_pos_ref,
               q_seg_ref, kv_pos_ref, kv_seg_ref, dq_ref, *, rule, scale, block_kv, num_kv):
  q, dout, lse, delta = q_ref[...], dout_ref[...], lse_ref[...], delta_ref[...]
  q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]

  def update(j, dq):
    span = pl.ds(j * block_kv, block_kv)
    k = k_ref[span, :]
    mask = masking.visible_broadcast(q_pos, kv_pos_ref[span][None, :], q_seg,
                                     kv_seg_ref[span][None, :], *rule)
    _, dlogits = common.probs_and_dlogits(q, k, v_ref[span, :], dout, lse, delta, mask, scale)
    return dq + dot(dlogits.astype(k.dtype), k, 1, 0)  # ds·k: (bq, D)

  dq = _skippable_loop(table_ref, num_kv, update, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


@common.kernel_jit("interpret")
def block_attention_bwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, *, causal, scale,
                        block_q=BLOCK_Q, block_kv=BLOCK_KV, window=0, sinks=0, interpret=None):
  """(dq, dk, dv) of this block's share, from the final out and lse [B, L, H]."""
  rule = (causal, window, sinks)
  plan = _Plan(q, k, q_pos, kv_pos, q_seg, kv_seg, rule, block_q, block_kv)
  batch, head_dim, group = q.shape[0], q.shape[3], plan.group
  q_pos, kv_pos, q_seg, kv_seg = plan.tokens

  lse, delta = masking.backward_rows(out, lse, dout)
  # [B, L, H] -> [B, H, L_padded]; padding rows get lse = +inf, so p = 0.
  padding = ((0, 0), (0, 0), (0, plan.q_len - q.shape[1]))
  lse = jnp.pad(lse.transpose(0, 2, 1), padding, constant_values=jnp.inf)
  delta = jnp.pad(delta.transpose(0, 2, 1), padding)
  operands = (plan.pad(q, plan.q_len), plan.pad(k, plan.kv_len), plan.pad(v, plan.kv_len),
              plan.pad(dout, plan.q_len), lse, delta, q_pos, q_seg, kv_pos, kv_seg)

  # dK/dV: grid (B, K, nk); every query block of the group's heads.
  whole_q = pl.BlockSpec((None, plan.q_len, group, head_dim), _group_at)
  kv_tile = pl.BlockSpec((None, plan.block_kv, None, head_dim), _head_tile_at)
  group_rows = pl.BlockSpec((None, group, plan.q_len), _group_rows_at)
  q_tokens = pl.BlockSpec((None, plan.q_len), _whole_at)
  kv_tokens = pl.BlockSpec((None, plan.block_kv), _tile_at)
  in_specs = [pl.BlockSpec((None, plan.table_by_kv.shape[1]), _table_row_at),
              whole_q, kv_tile, kv_tile, whole_q, group_rows, group_rows,
              q_tokens, q_tokens, kv_tokens, kv_tokens]
  kernel = functools.partial(_dkv_kernel, rule=rule, scale=scale, block_q=plan.block_q,
                             num_q=plan.num_q, group=group)
  dk, dv = _call(kernel, (batch, k.shape[2], plan.num_kv), in_specs, [kv_tile, kv_tile],
                 [jax.ShapeDtypeStruct(operands[1].shape, k.dtype),
                  jax.ShapeDtypeStruct(operands[2].shape, v.dtype)],
                 interpret, "ringlm_attention_dkv")(plan.table_by_kv, *operands)

  # dQ: grid (B, H, nq), like the forward.
  table_spec, q_tile, whole_kv, q_rows, token_specs = plan.query_grid_specs(head_dim)
  in_specs = [table_spec, q_tile, whole_kv, whole_kv, q_tile, q_rows, q_rows, *token_specs]
  kernel = functools.partial(_dq_kernel, rule=rule, scale=scale, block_kv=plan.block_kv,
                             num_kv=plan.num_kv)
  dq = _call(kernel, (batch, q.shape[2], plan.num_q), in_specs, q_tile,
             jax.ShapeDtypeStruct(operands[0].shape, q.dtype),
             interpret, "ringlm_attention_dq")(plan.table_by_q, *operands)
  return dq[:, :q.shape[1]], dk[:, :k.shape[1]], dv[:, :k.shape[1]]
