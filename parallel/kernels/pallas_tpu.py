"""Block attention as Pallas TPU (Mosaic) kernels: forward, dK/dV and dQ (FlashAttention-2).

Same contract as `xla.py`: q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], positions and
segment ids [B, L] int32 -> out [B, Lq, Hq, D], lse [B, Lq, Hq] f32; the backward
takes the final (out, lse) and dout. On CPU the kernels run in interpret mode.

Layout. The wrappers move heads before length ([B, H, L, D]) so every block's last
two dims are (rows, D), as Mosaic wants. Positions and segment ids are broadcast
over lanes for queries ([B, Lq, 128], a column per block) and over sublanes for
keys ([B, 8, Lk], a row per block); lse and delta cross the kernel boundary as
[B, Hq, Lq, 128]. Lengths are padded to whole blocks with self-masking values
(masking.py). Blocks are rounded up to Mosaic's tiles: block_q to a multiple of 8,
block_kv to a multiple of 128 (or the whole padded length when that is shorter).

Skipping. Two scalar-prefetched [nq, nk] int32 tables: `table` (may q block i see kv
block j, masking.block_table) gates the compute with pl.when, and `fetch` names the
block to load at each step: for a skipped step it repeats the previous block index,
so the pipeline issues no DMA (masking.fetch_table).

Grids and BlockSpecs (G = Hq // Hkv query heads per kv head; the kv head of query
head h is h // G, taken in the index maps, so KV is never repeated in HBM):

  forward  grid (B, Hq, nq, nk), semantics (parallel, parallel, parallel, arbitrary)
    q, out       (bq, D)   at (b, h, i)              resident across the nk axis
    k, v         (bk, D)   at (b, h // G, fetch[i, j])
    q pos/seg    (bq, 128) at (b, i);   kv pos/seg (8, bk) at (b, fetch[i, j])
    lse          (bq, 128) at (b, h, i)
    scratch      running max m and sum l (bq, 128) f32, accumulator (bq, D) f32
  dK/dV    grid (B, Hkv, nk, G * nq): the last axis walks the group's G query heads
           and, for each, its nq query blocks (t -> head g = t // nq, block i = t % nq)
    k, v, dk, dv (bk, D)   at (b, hkv, j)            resident across the last axis
    q, dout      (bq, D)   at (b, hkv * G + g, fetch_q[j, i]); lse, delta (bq, 128) likewise
    scratch      dk, dv (bk, D) f32
  dQ       grid (B, Hq, nq, nk), like the forward
    q, dout, dq  (bq, D)   at (b, h, i); k, v (bk, D) at (b, h // G, fetch[i, j])
    scratch      dq (bq, D) f32
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from parallel.kernels import masking

LANES, SUBLANES = 128, 8
NEG_INF = -jnp.inf
BLOCK_Q, BLOCK_KV = 512, 512


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


class _Plan:
  """Block sizes, padded lengths, tables and the lane-broadcast token arrays of one call."""

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv):
    batch, q_len, q_heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    block_q, block_kv = _round_up(block_q, SUBLANES), _round_up(block_kv, LANES)  # Mosaic tiles
    self.group = q_heads // kv_heads
    self.block_q = min(block_q, _round_up(q_len, SUBLANES))
    self.block_kv = min(block_kv, _round_up(kv_len, SUBLANES))
    self.q_len, self.kv_len = _round_up(q_len, self.block_q), _round_up(kv_len, self.block_kv)
    self.num_q, self.num_kv = self.q_len // self.block_q, self.kv_len // self.block_kv
    q_pos, kv_pos, q_seg, kv_seg = masking.pad_tokens(q_pos, kv_pos, q_seg, kv_seg,
                                                      self.q_len, self.kv_len)
    table = masking.block_table(q_pos, kv_pos, q_seg, kv_seg, self.block_q, self.block_kv,
                                causal)
    self.table = table.astype(jnp.int32)
    self.fetch_kv = masking.fetch_table(table)      # [nq, nk]
    self.fetch_q = masking.fetch_table(table.T)     # [nk, nq]
    column = lambda x: jnp.broadcast_to(x[:, :, None], (batch, x.shape[1], LANES))
    row = lambda x: jnp.broadcast_to(x[:, None, :], (batch, SUBLANES, x.shape[1]))
    self.tokens = (column(q_pos), column(q_seg), row(kv_pos), row(kv_seg))

  def heads_first(self, x, length):
    """[B, L, H, D] -> [B, H, L_padded, D]."""
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3)

  def lanes(self, x, pad_value):
    """[B, Lq, Hq] row statistics -> [B, Hq, Lq_padded, 128]."""
    x = jnp.pad(x, ((0, 0), (0, self.q_len - x.shape[1]), (0, 0)), constant_values=pad_value)
    x = x.transpose(0, 2, 1)  # [B, Hq, Lq]
    return jnp.broadcast_to(x[..., None], x.shape + (LANES,))


def _mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, causal):
  """(bq, bk) visibility from a column of queries and a row of keys."""
  return masking.visible_broadcast(q_pos_ref[...][:, :1], kv_pos_ref[...][:1, :],
                                   q_seg_ref[...][:, :1], kv_seg_ref[...][:1, :], causal)


def _dot(a, b, contract_a, contract_b):
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


# Every grid here is (batch, heads, outer blocks, reduction axis).
_COMPILER_PARAMS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _interpret(interpret):
  return jax.default_backend() == "cpu" if interpret is None else interpret


# --------------------------------------------------------------------------- forward

def _forward_kernel(table_ref, fetch_ref, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref,
                    kv_pos_ref, kv_seg_ref, out_ref, lse_ref, max_ref, sum_ref, acc_ref, *,
                    causal, scale):
  del fetch_ref  # used by the index maps
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    max_ref[...] = jnp.full(max_ref.shape, NEG_INF, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(table_ref[i, j] != 0)
  def _update():
    logits = _dot(q_ref[...], k_ref[...], 1, 1) * scale  # (bq, bk)
    logits = jnp.where(_mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, causal), logits,
                       NEG_INF)
    old_max = max_ref[...][:, :1]
    new_max = jnp.maximum(old_max, logits.max(axis=1, keepdims=True))
    safe_max = jnp.where(new_max == NEG_INF, 0.0, new_max)  # rows with no key yet
    probs = jnp.exp(logits - safe_max)
    correction = jnp.exp(old_max - safe_max)
    row_sum = correction * sum_ref[...][:, :1] + probs.sum(axis=1, keepdims=True)
    acc_ref[...] = correction * acc_ref[...] + _dot(probs.astype(v_ref.dtype), v_ref[...], 1, 0)
    max_ref[...] = jnp.broadcast_to(new_max, max_ref.shape)
    sum_ref[...] = jnp.broadcast_to(row_sum, sum_ref.shape)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    row_sum = sum_ref[...][:, :1]
    empty = row_sum == 0
    safe_sum = jnp.where(empty, 1.0, row_sum)
    out_ref[...] = (acc_ref[...] / safe_sum).astype(out_ref.dtype)
    lse = jnp.where(empty, NEG_INF, max_ref[...][:, :1] + jnp.log(safe_sum))
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv",
                                             "interpret"))
def block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale, block_q=BLOCK_Q,
                    block_kv=BLOCK_KV, interpret=None):
  """Forward; see the module docstring. interpret=None: interpret mode on CPU only."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  plan = _Plan(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv)
  bq, bk, group = plan.block_q, plan.block_kv, plan.group

  q_map = lambda b, h, i, j, table, fetch: (b, h, i, 0)
  kv_map = lambda b, h, i, j, table, fetch: (b, lax.div(h, group), fetch[i, j], 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(batch, q_heads, plan.num_q, plan.num_kv),
      in_specs=[
          pl.BlockSpec((None, None, bq, head_dim), q_map),
          pl.BlockSpec((None, None, bk, head_dim), kv_map),
          pl.BlockSpec((None, None, bk, head_dim), kv_map),
          pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, table, fetch: (b, i, 0)),
          pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, table, fetch: (b, i, 0)),
          pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j, table, fetch: (b, 0, fetch[i, j])),
          pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j, table, fetch: (b, 0, fetch[i, j])),
      ],
      out_specs=[pl.BlockSpec((None, None, bq, head_dim), q_map),
                 pl.BlockSpec((None, None, bq, LANES), q_map)],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, head_dim), jnp.float32)])
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, causal=causal, scale=scale),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((batch, q_heads, plan.q_len, head_dim), q.dtype),
                 jax.ShapeDtypeStruct((batch, q_heads, plan.q_len, LANES), jnp.float32)],
      compiler_params=_COMPILER_PARAMS,
      interpret=_interpret(interpret),
      name="ringlm_attention_fwd",
  )(plan.table, plan.fetch_kv, plan.heads_first(q, plan.q_len), plan.heads_first(k, plan.kv_len),
    plan.heads_first(v, plan.kv_len), *plan.tokens)
  out = out.transpose(0, 2, 1, 3)[:, :q_len]           # [B, Hq, Lq, D] -> [B, Lq, Hq, D]
  lse = lse[..., 0].transpose(0, 2, 1)[:, :q_len]      # [B, Hq, Lq, 128] -> [B, Lq, Hq]
  return out, lse


# --------------------------------------------------------------------------- backward

def _probs_and_dlogits(q, k, v, dout, lse, delta, mask, scale):
  """p = exp(s - lse) and ds = p * (dout·vᵀ - delta) * scale, both (bq, bk) f32."""
  logits = jnp.where(mask, _dot(q, k, 1, 1) * scale, NEG_INF)
  probs = jnp.exp(logits - lse)
  dprobs = _dot(dout, v, 1, 1)
  return probs, probs * (dprobs - delta) * scale


def _dkv_kernel(table_ref, fetch_ref, q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref,
                q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, dk_ref, dv_ref, dk_acc, dv_acc, *,
                causal, scale, num_q):
  del fetch_ref
  j, t = pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  @pl.when(table_ref[j, lax.rem(t, num_q)] != 0)
  def _update():
    q, dout = q_ref[...], dout_ref[...]
    mask = _mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, causal)
    probs, dlogits = _probs_and_dlogits(q, k_ref[...], v_ref[...], dout, lse_ref[...][:, :1],
                                        delta_ref[...][:, :1], mask, scale)
    dv_acc[...] += _dot(probs.astype(dout.dtype), dout, 0, 0)  # pᵀ·dout: (bk, D)
    dk_acc[...] += _dot(dlogits.astype(q.dtype), q, 0, 0)      # dsᵀ·q: (bk, D)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(table_ref, fetch_ref, q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref,
               q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, dq_ref, dq_acc, *, causal, scale):
  del fetch_ref
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  @pl.when(table_ref[i, j] != 0)
  def _update():
    k = k_ref[...]
    mask = _mask(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, causal)
    _, dlogits = _probs_and_dlogits(q_ref[...], k, v_ref[...], dout_ref[...],
                                    lse_ref[...][:, :1], delta_ref[...][:, :1], mask, scale)
    dq_acc[...] += _dot(dlogits.astype(k.dtype), k, 1, 0)      # ds·k: (bq, D)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv",
                                             "interpret"))
def block_attention_bwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, *, causal, scale,
                        block_q=BLOCK_Q, block_kv=BLOCK_KV, interpret=None):
  """(dq, dk, dv) of this block's share, from the final out and lse [B, Lq, Hq]."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  plan = _Plan(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv)
  bq, bk, group, num_q = plan.block_q, plan.block_kv, plan.group, plan.num_q

  lse, delta = masking.backward_rows(out, lse, dout)
  lse, delta = plan.lanes(lse, jnp.inf), plan.lanes(delta, 0.0)  # padding rows: p = 0
  q_t, dout_t = plan.heads_first(q, plan.q_len), plan.heads_first(dout, plan.q_len)
  k_t, v_t = plan.heads_first(k, plan.kv_len), plan.heads_first(v, plan.kv_len)
  operands = (q_t, k_t, v_t, dout_t, lse, delta, *plan.tokens)
  token_specs = lambda q_at, kv_at: [
      pl.BlockSpec((None, bq, LANES), q_at), pl.BlockSpec((None, bq, LANES), q_at),
      pl.BlockSpec((None, SUBLANES, bk), kv_at), pl.BlockSpec((None, SUBLANES, bk), kv_at)]

  # dK/dV: t walks (query head of the group, query block).
  def q_at(b, hkv, j, t, table, fetch):
    return (b, hkv * group + lax.div(t, num_q), fetch[j, lax.rem(t, num_q)], 0)
  kv_at = lambda b, hkv, j, t, table, fetch: (b, hkv, j, 0)
  q_tokens_at = lambda b, hkv, j, t, table, fetch: (b, fetch[j, lax.rem(t, num_q)], 0)
  kv_tokens_at = lambda b, hkv, j, t, table, fetch: (b, 0, j)
  dkv_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(batch, kv_heads, plan.num_kv, group * num_q),
      in_specs=[pl.BlockSpec((None, None, bq, head_dim), q_at),
                pl.BlockSpec((None, None, bk, head_dim), kv_at),
                pl.BlockSpec((None, None, bk, head_dim), kv_at),
                pl.BlockSpec((None, None, bq, head_dim), q_at),
                pl.BlockSpec((None, None, bq, LANES), q_at),
                pl.BlockSpec((None, None, bq, LANES), q_at),
                *token_specs(q_tokens_at, kv_tokens_at)],
      out_specs=[pl.BlockSpec((None, None, bk, head_dim), kv_at)] * 2,
      scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32)] * 2)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, causal=causal, scale=scale, num_q=num_q),
      grid_spec=dkv_spec,
      out_shape=[jax.ShapeDtypeStruct(k_t.shape, k.dtype), jax.ShapeDtypeStruct(v_t.shape, v.dtype)],
      compiler_params=_COMPILER_PARAMS,
      interpret=_interpret(interpret),
      name="ringlm_attention_dkv",
  )(plan.table.T, plan.fetch_q, *operands)

  # dQ: like the forward.
  q_map = lambda b, h, i, j, table, fetch: (b, h, i, 0)
  kv_map = lambda b, h, i, j, table, fetch: (b, lax.div(h, group), fetch[i, j], 0)
  dq_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(batch, q_heads, num_q, plan.num_kv),
      in_specs=[pl.BlockSpec((None, None, bq, head_dim), q_map),
                pl.BlockSpec((None, None, bk, head_dim), kv_map),
                pl.BlockSpec((None, None, bk, head_dim), kv_map),
                pl.BlockSpec((None, None, bq, head_dim), q_map),
                pl.BlockSpec((None, None, bq, LANES), q_map),
                pl.BlockSpec((None, None, bq, LANES), q_map),
                *token_specs(lambda b, h, i, j, table, fetch: (b, i, 0),
                             lambda b, h, i, j, table, fetch: (b, 0, fetch[i, j]))],
      out_specs=pl.BlockSpec((None, None, bq, head_dim), q_map),
      scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)])
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, causal=causal, scale=scale),
      grid_spec=dq_spec,
      out_shape=jax.ShapeDtypeStruct(q_t.shape, q.dtype),
      compiler_params=_COMPILER_PARAMS,
      interpret=_interpret(interpret),
      name="ringlm_attention_dq",
  )(plan.table, plan.fetch_kv, *operands)

  back = lambda x, length: x.transpose(0, 2, 1, 3)[:, :length]
  return back(dq, q_len), back(dk, kv_len), back(dv, kv_len)
