"""Block attention as Pallas TPU (Mosaic) kernels: forward, dK/dV and dQ (FlashAttention-2).

Dimension letters: core/__init__.py.

Same contract as `xla.py`: q [B, L, H, D], k/v [B, S, K, D], positions and segment
ids [B, L] / [B, S] int32 -> out [B, L, H, D], lse [B, L, H] f32; the backward takes
the final (out, lse) and dout. On CPU the kernels run in interpret mode.

Layout. The wrappers move heads before length ([B, H, L, D], [B, K, S, D]) so every
block's last two dims are (rows, D), as Mosaic wants. Positions and segment ids are
broadcast over lanes for queries ([B, L, 128], a column per block) and over sublanes
for keys ([B, 8, S], a row per block); lse and delta cross the kernel boundary as
[B, H, L, 128]. Lengths are padded to whole blocks with self-masking values
(masking.py). Blocks are rounded up to Mosaic's tiles: block_q to a multiple of 8,
block_kv to a multiple of 128 (or the whole padded length when that is shorter).

Skipping. Two scalar-prefetched [nq, nk] int32 tables: `table` (may q block i see kv
block j, masking.block_table) gates the compute with pl.when, and `fetch` names the
block to load at each step: for a skipped step it repeats the previous block index,
so the pipeline issues no DMA (masking.fetch_table). Both tables live in SMEM (1 MiB
on v4-v6e): a call whose table would hold more than `table_entries` (TABLE_ENTRIES)
entries is split into calls over spans of whole blocks, each with its own smaller table:
query spans for the forward and dQ, key spans for dK/dV, so no call sums into another's
output. (Unsplit, a 256K-token block on each of 64 chips, as a 16M-token prompt is
prefilled, needs 512 x 512 blocks: 2 MiB of tables, which Mosaic refuses.)

Grids and BlockSpecs (G = H // K query heads per kv head; the kv head of query head h
is h // G, taken in the index maps, so KV is never repeated in HBM). Grid indices are
b, h (query head), k (kv head), i (q block), j (kv block); the index maps below name
each block's place:

  forward  grid (B, H, nq, nk), semantics (parallel, parallel, parallel, arbitrary)
    q, out       (bq, D)   at (b, h, i)              resident across the nk axis
    k, v         (bk, D)   at (b, h // G, fetch[i, j])
    q pos/seg    (bq, 128) at (b, i);   kv pos/seg (8, bk) at (b, fetch[i, j])
    lse          (bq, 128) at (b, h, i)
    scratch      running max m and sum l (bq, 128) f32, accumulator (bq, D) f32
  dK/dV    grid (B, K, nk, G * nq): the last axis walks the group's G query heads
           and, for each, its nq query blocks (t -> head g = t // nq, block i = t % nq)
    k, v, dk, dv (bk, D)   at (b, k, j)              resident across the last axis
    q, dout      (bq, D)   at (b, k * G + g, fetch_q[j, i]); lse, delta (bq, 128) likewise
    scratch      dk, dv (bk, D) f32
  dQ       grid (B, H, nq, nk), like the forward
    q, dout, dq  (bq, D)   at (b, h, i); k, v (bk, D) at (b, h // G, fetch[i, j])
    scratch      dq (bq, D) f32
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from parallel.kernels import common, masking
from parallel.kernels.common import NEG_INF, dot, round_up

LANES, SUBLANES = 128, 8
BLOCK_Q, BLOCK_KV = 512, 512
TABLE_ENTRIES = 65536  # per skip table: the two int32 tables then take 512 KiB of SMEM


def _blocks(q_len, kv_len, block_q, block_kv):
  """The (block_q, block_kv) a call uses: rounded up to Mosaic's tiles (8 rows, 128 lanes),
  at most the (tile-rounded) length."""
  block_q, block_kv = round_up(block_q, SUBLANES), round_up(block_kv, LANES)
  return min(block_q, round_up(q_len, SUBLANES)), min(block_kv, round_up(kv_len, SUBLANES))


def _spans(length, block, other_blocks, table_entries):
  """[(start, stop)] cutting a `length`-token axis into spans of whole `block`s, each
  span's blocks x `other_blocks` at most `table_entries` (at least one block a span)."""
  step = max(1, table_entries // other_blocks) * block
  return [(start, min(start + step, length)) for start in range(0, length, step)]


def _rows(x, span):
  """x[:, start:stop] (every per-token array here has tokens on axis 1)."""
  return x[:, span[0]:span[1]]


class _Plan:
  """Block sizes, padded lengths, tables and the lane-broadcast token arrays of one call."""

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, rule, block_q, block_kv):
    masking.check_window(*rule)
    batch, q_len, q_heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    self.group = q_heads // kv_heads
    self.block_q, self.block_kv = _blocks(q_len, kv_len, block_q, block_kv)
    self.q_len, self.kv_len = round_up(q_len, self.block_q), round_up(kv_len, self.block_kv)
    self.num_q, self.num_kv = self.q_len // self.block_q, self.kv_len // self.block_kv
    q_pos, kv_pos, q_seg, kv_seg = masking.pad_tokens(q_pos, kv_pos, q_seg, kv_seg,
                                                      self.q_len, self.kv_len)
    table = masking.block_table(q_pos, kv_pos, q_seg, kv_seg, self.block_q, self.block_kv,
                                *rule)
    self.table = table.astype(jnp.int32)
    self.fetch_kv = masking.fetch_table(table)      # [nq, nk]
    self.fetch_q = masking.fetch_table(table.T)     # [nk, nq]
    column = lambda x: jnp.broadcast_to(x[:, :, None], (batch, x.shape[1], LANES))
    row = lambda x: jnp.broadcast_to(x[:, None, :], (batch, SUBLANES, x.shape[1]))
    self.tokens = (column(q_pos), column(q_seg), row(kv_pos), row(kv_seg))

  def heads_first(self, x, length):
    """[B, L, H, D] -> [B, H, L_padded, D] (likewise [B, S, K, D])."""
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3)

  def lanes(self, x, pad_value):
    """[B, L, H] row statistics -> [B, H, L_padded, 128]."""
    x = jnp.pad(x, ((0, 0), (0, self.q_len - x.shape[1]), (0, 0)), constant_values=pad_value)
    x = x.transpose(0, 2, 1)  # [B, H, L]
    return jnp.broadcast_to(x[..., None], x.shape + (LANES,))

  def specs(self, head_dim, q_at, kv_at, q_tokens_at, kv_tokens_at):
    """The BlockSpecs of one grid from its index maps: (q-like (bq, D), kv-like (bk, D),
    row statistics (bq, 128), the four token arrays)."""
    bq, bk = self.block_q, self.block_kv
    q_tokens = pl.BlockSpec((None, bq, LANES), q_tokens_at)
    kv_tokens = pl.BlockSpec((None, SUBLANES, bk), kv_tokens_at)
    return (pl.BlockSpec((None, None, bq, head_dim), q_at),
            pl.BlockSpec((None, None, bk, head_dim), kv_at),
            pl.BlockSpec((None, None, bq, LANES), q_at),
            [q_tokens, q_tokens, kv_tokens, kv_tokens])


# --------------------------------------------------------------------------- index maps
# Forward and dQ: grid (b, h, i, j) over (B, H, nq, nk), `fetch` = plan.fetch_kv.

def _q_block_at(b, h, i, j, table, fetch):
  """q, out, dout, dq, lse and delta of query head h, q block i."""
  return (b, h, i, 0)


def _kv_block_at(group):
  """k and v of the kv head of query head h, the kv block to load at step j."""
  return lambda b, h, i, j, table, fetch: (b, lax.div(h, group), fetch[i, j], 0)


def _q_tokens_at(b, h, i, j, table, fetch):
  return (b, i, 0)


def _kv_tokens_at(b, h, i, j, table, fetch):
  return (b, 0, fetch[i, j])


# dK/dV: grid (b, k, j, t) over (B, K, nk, G * nq), `fetch` = plan.fetch_q; step t is
# query head k * G + t // nq of the group, q block t % nq.

def _group_q_block_at(group, num_q):
  """q, dout, lse and delta of the group's query head and q block to load at step t."""
  def at(b, k, j, t, table, fetch):
    return (b, k * group + lax.div(t, num_q), fetch[j, lax.rem(t, num_q)], 0)
  return at


def _group_q_tokens_at(num_q):
  return lambda b, k, j, t, table, fetch: (b, fetch[j, lax.rem(t, num_q)], 0)


def _kv_held_at(b, k, j, t, table, fetch):
  """k, v, dk and dv of kv head k, kv block j: resident across the t axis."""
  return (b, k, j, 0)


def _kv_held_tokens_at(b, k, j, t, table, fetch):
  return (b, 0, j)


def _query_grid_maps(group):
  """The index maps of the forward and dQ grid, in `_Plan.specs` order."""
  return _q_block_at, _kv_block_at(group), _q_tokens_at, _kv_tokens_at


def _key_grid_maps(group, num_q):
  """The index maps of the dK/dV grid, in `_Plan.specs` order."""
  return (_group_q_block_at(group, num_q), _kv_held_at, _group_q_tokens_at(num_q),
          _kv_held_tokens_at)


def _mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, rule):
  """(bq, bk) visibility from a column of queries and a row of keys; `rule` is
  (causal, window, sinks) (masking.py)."""
  return masking.visible_broadcast(q_pos_ref[...][:, :1], kv_pos_ref[...][:1, :],
                                   q_seg_ref[...][:, :1], kv_seg_ref[...][:1, :], *rule)


def _call(kernel, grid_spec, out_shape, interpret, name):
  """pallas_call for a grid (batch, heads, outer blocks, reduction axis), as all are here."""
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=common.interpret_mode(interpret), name=name)


# --------------------------------------------------------------------------- forward

def _forward_kernel(table_ref, fetch_ref, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref,
                    kv_pos_ref, kv_seg_ref, out_ref, lse_ref, max_ref, sum_ref, acc_ref, *,
                    rule, scale):
  del fetch_ref  # used by the index maps
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    max_ref[...] = jnp.full(max_ref.shape, NEG_INF, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(table_ref[i, j] != 0)
  def _update():
    logits = dot(q_ref[...], k_ref[...], 1, 1) * scale  # (bq, bk)
    logits = jnp.where(_mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, rule), logits,
                       NEG_INF)
    new_max, row_sum, probs, correction = common.softmax_update(
        max_ref[...][:, :1], sum_ref[...][:, :1], logits)
    acc_ref[...] = correction * acc_ref[...] + dot(probs.astype(v_ref.dtype), v_ref[...], 1, 0)
    max_ref[...] = jnp.broadcast_to(new_max, max_ref.shape)
    sum_ref[...] = jnp.broadcast_to(row_sum, sum_ref.shape)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    out, lse = common.softmax_finish(acc_ref[...], max_ref[...][:, :1], sum_ref[...][:, :1])
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


@common.kernel_jit("interpret", "table_entries")
def block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale, block_q=BLOCK_Q,
                    block_kv=BLOCK_KV, window=0, sinks=0, interpret=None,
                    table_entries=TABLE_ENTRIES):
  """Forward; see the module docstring. window / sinks: the sliding window (masking.py;
  0: none). interpret=None: interpret mode on CPU only. table_entries: the largest skip
  table one call may have; a longer q is split into spans (the module docstring)."""
  block_q, block_kv = _blocks(q.shape[1], k.shape[1], block_q, block_kv)
  spans = _spans(q.shape[1], block_q, -(-k.shape[1] // block_kv), table_entries)
  parts = [_forward(_rows(q, span), k, v, _rows(q_pos, span), kv_pos, _rows(q_seg, span),
                    kv_seg, (causal, window, sinks), scale, block_q, block_kv, interpret)
           for span in spans]
  return tuple(jnp.concatenate(x, axis=1) for x in zip(*parts)) if len(parts) > 1 else parts[0]


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, rule, scale, block_q, block_kv, interpret):
  """One forward call: out [B, L, H, D], lse [B, L, H]."""
  batch, q_len, q_heads, head_dim = q.shape
  plan = _Plan(q, k, q_pos, kv_pos, q_seg, kv_seg, rule, block_q, block_kv)
  bq = plan.block_q
  q_spec, kv_spec, rows_spec, token_specs = plan.specs(head_dim, *_query_grid_maps(plan.group))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(batch, q_heads, plan.num_q, plan.num_kv),
      in_specs=[q_spec, kv_spec, kv_spec, *token_specs],
      out_specs=[q_spec, rows_spec],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, head_dim), jnp.float32)])
  out, lse = _call(
      functools.partial(_forward_kernel, rule=rule, scale=scale), grid_spec,
      [jax.ShapeDtypeStruct((batch, q_heads, plan.q_len, head_dim), q.dtype),
       jax.ShapeDtypeStruct((batch, q_heads, plan.q_len, LANES), jnp.float32)],
      interpret, "ringlm_attention_fwd",
  )(plan.table, plan.fetch_kv, plan.heads_first(q, plan.q_len), plan.heads_first(k, plan.kv_len),
    plan.heads_first(v, plan.kv_len), *plan.tokens)
  out = out.transpose(0, 2, 1, 3)[:, :q_len]           # [B, H, L, D] -> [B, L, H, D]
  lse = lse[..., 0].transpose(0, 2, 1)[:, :q_len]      # [B, H, L, 128] -> [B, L, H]
  return out, lse


# --------------------------------------------------------------------------- backward

def _dkv_kernel(table_ref, fetch_ref, q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref,
                q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, dk_ref, dv_ref, dk_acc, dv_acc, *,
                rule, scale, num_q):
  del fetch_ref
  j, t = pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  @pl.when(table_ref[j, lax.rem(t, num_q)] != 0)
  def _update():
    q, dout = q_ref[...], dout_ref[...]
    mask = _mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, rule)
    probs, dlogits = common.probs_and_dlogits(q, k_ref[...], v_ref[...], dout,
                                              lse_ref[...][:, :1], delta_ref[...][:, :1], mask,
                                              scale)
    dv_acc[...] += dot(probs.astype(dout.dtype), dout, 0, 0)  # pᵀ·dout: (bk, D)
    dk_acc[...] += dot(dlogits.astype(q.dtype), q, 0, 0)      # dsᵀ·q: (bk, D)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(table_ref, fetch_ref, q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref,
               q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, dq_ref, dq_acc, *, rule, scale):
  del fetch_ref
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  @pl.when(table_ref[i, j] != 0)
  def _update():
    k = k_ref[...]
    mask = _mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, rule)
    _, dlogits = common.probs_and_dlogits(q_ref[...], k, v_ref[...], dout_ref[...],
                                          lse_ref[...][:, :1], delta_ref[...][:, :1], mask,
                                          scale)
    dq_acc[...] += dot(dlogits.astype(k.dtype), k, 1, 0)      # ds·k: (bq, D)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


@common.kernel_jit("interpret", "table_entries")
def block_attention_bwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, *, causal, scale,
                        block_q=BLOCK_Q, block_kv=BLOCK_KV, window=0, sinks=0, interpret=None,
                        table_entries=TABLE_ENTRIES):
  """(dq, dk, dv) of this block's share, from the final out and lse [B, L, H]. A table
  over `table_entries` splits dQ over query spans and dK/dV over key spans."""
  rule = (causal, window, sinks)
  block_q, block_kv = _blocks(q.shape[1], k.shape[1], block_q, block_kv)
  num_q, num_kv = -(-q.shape[1] // block_q), -(-k.shape[1] // block_kv)
  if num_q * num_kv <= table_entries:
    return _backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, rule, scale,
                     block_q, block_kv, interpret)
  q_rows = (q, q_pos, q_seg, out, lse, dout)
  dq = [_backward(*_q_side(q_rows, k, v, kv_pos, kv_seg, span), rule, scale, block_q,
                  block_kv, interpret, grads="dq")[0]
        for span in _spans(q.shape[1], block_q, num_kv, table_entries)]
  dkv = [_backward(*_q_side(q_rows, _rows(k, span), _rows(v, span), _rows(kv_pos, span),
                            _rows(kv_seg, span), None), rule, scale, block_q, block_kv,
                   interpret, grads="dkv")[1:]
         for span in _spans(k.shape[1], block_kv, num_q, table_entries)]
  dk, dv = (jnp.concatenate(x, axis=1) for x in zip(*dkv))
  return jnp.concatenate(dq, axis=1), dk, dv


def _q_side(q_rows, k, v, kv_pos, kv_seg, span):
  """_backward's arguments from the query-side arrays (q, q_pos, q_seg, out, lse, dout),
  cut to `span` (None: whole), and the key side."""
  q, q_pos, q_seg, out, lse, dout = (x if span is None else _rows(x, span) for x in q_rows)
  return q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout


def _backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, rule, scale, block_q,
              block_kv, interpret, grads="dq dkv"):
  """One call of the `grads` kernels ("dq", "dkv" or both): (dq, dk, dv), None for the
  ones not asked for."""
  plan = _Plan(q, k, q_pos, kv_pos, q_seg, kv_seg, rule, block_q, block_kv)
  batch, head_dim, group, num_q = q.shape[0], q.shape[3], plan.group, plan.num_q

  lse, delta = masking.backward_rows(out, lse, dout)
  lse, delta = plan.lanes(lse, jnp.inf), plan.lanes(delta, 0.0)  # padding rows: p = 0
  q_t, dout_t = plan.heads_first(q, plan.q_len), plan.heads_first(dout, plan.q_len)
  k_t, v_t = plan.heads_first(k, plan.kv_len), plan.heads_first(v, plan.kv_len)
  operands = (q_t, k_t, v_t, dout_t, lse, delta, *plan.tokens)

  def grid_spec(grid, maps, writes_kv):
    """Both backward grids read (q, k, v, dout, lse, delta, tokens) at the index `maps`;
    the dK/dV grid (writes_kv) writes dk, dv (bk, D), the dQ grid dq (bq, D), each
    accumulated in f32 scratch."""
    q_spec, kv_spec, rows_spec, token_specs = plan.specs(head_dim, *maps)
    if writes_kv:
      out_specs, scratch = [kv_spec] * 2, [pltpu.VMEM((plan.block_kv, head_dim), jnp.float32)] * 2
    else:
      out_specs, scratch = q_spec, [pltpu.VMEM((plan.block_q, head_dim), jnp.float32)]
    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, rows_spec, rows_spec, *token_specs],
        out_specs=out_specs, scratch_shapes=scratch)

  back = lambda x, length: x.transpose(0, 2, 1, 3)[:, :length]
  dq = dk = dv = None
  # dK/dV: t walks (query head of the group, query block).
  if "dkv" in grads:
    dk, dv = _call(
        functools.partial(_dkv_kernel, rule=rule, scale=scale, num_q=num_q),
        grid_spec((batch, k.shape[2], plan.num_kv, group * num_q),
                  _key_grid_maps(group, num_q), writes_kv=True),
        [jax.ShapeDtypeStruct(k_t.shape, k.dtype), jax.ShapeDtypeStruct(v_t.shape, v.dtype)],
        interpret, "ringlm_attention_dkv",
    )(plan.table.T, plan.fetch_q, *operands)
    dk, dv = back(dk, k.shape[1]), back(dv, k.shape[1])

  # dQ: like the forward.
  if "dq" in grads:
    dq = back(_call(
        functools.partial(_dq_kernel, rule=rule, scale=scale),
        grid_spec((batch, q.shape[2], num_q, plan.num_kv), _query_grid_maps(group),
                  writes_kv=False),
        jax.ShapeDtypeStruct(q_t.shape, q.dtype), interpret, "ringlm_attention_dq",
    )(plan.table, plan.fetch_kv, *operands), q.shape[1])
  return dq, dk, dv
