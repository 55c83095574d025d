"""Block attention as Pallas GPU kernels (Triton backend): forward, dK/dV and dQ.

Same contract as `xla.py`: q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], positions and
segment ids [B, L] int32 -> out [B, Lq, Hq, D], lse [B, Lq, Hq] f32; the backward
takes the final (out, lse) and dout. On CPU the kernels run in interpret mode.

Triton has no scalar prefetch and no scratch buffers, so each program keeps its
block in registers and walks the other side with a `fori_loop`; a row of the skip
table (masking.block_table, a plain input) gates each step with `lax.cond`, so
fully masked blocks are neither loaded nor computed. Arrays stay in the caller's
[B, L, H, D] layout (Triton loads strided tiles); lengths are padded to whole blocks
with self-masking values (masking.py). Triton tiles must be powers of two: block_q,
block_kv and head_dim.

Grids and BlockSpecs (G = Hq // Hkv; query head h reads kv head h // G):

  forward  grid (B, Hq, nq)
    q, out      (bq, D)      at (b, i, h)       in registers
    k, v        (Lk, D)      at (b, 0, h // G)  whole sequence; the loop loads (bk, D) tiles
    table row   (nk,)        at (i)
    lse         (bq,)        at (b, h, i)
  dK/dV    grid (B, Hkv, nk)
    k, v, dk, dv (bk, D)     at (b, j, hkv)     in registers
    q, dout     (Lq, G, D)   at (b, 0, hkv)     the group's G query heads; the loop loads (bq, D)
    lse, delta  (G, Lq)      at (b, hkv, 0);    table row (nq,) at (j)
  dQ       grid (B, Hq, nq), like the forward
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from parallel.kernels import masking

NEG_INF = -jnp.inf
BLOCK_Q, BLOCK_KV = 64, 64


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


def _power_of_two(x):
  return x > 0 and x & (x - 1) == 0


class _Plan:
  """Block sizes, padded lengths, skip tables and padded tokens of one call."""

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv):
    q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if not (_power_of_two(block_q) and _power_of_two(block_kv) and _power_of_two(head_dim)):
      raise ValueError(f"attention.block_q={block_q}, attention.block_kv={block_kv} and the head "
                       f"dim {head_dim} must be powers of two for the Triton kernels")
    self.group = q.shape[2] // k.shape[2]
    self.block_q = min(block_q, pl.next_power_of_2(q_len))
    self.block_kv = min(block_kv, pl.next_power_of_2(kv_len))
    self.q_len, self.kv_len = _round_up(q_len, self.block_q), _round_up(kv_len, self.block_kv)
    self.num_q, self.num_kv = self.q_len // self.block_q, self.kv_len // self.block_kv
    self.tokens = masking.pad_tokens(q_pos, kv_pos, q_seg, kv_seg, self.q_len, self.kv_len)
    table = masking.block_table(*self.tokens, self.block_q, self.block_kv, causal)
    # Rows are loaded whole, so their length is padded to a power of two (with False).
    pad = lambda t: jnp.pad(t, ((0, 0), (0, pl.next_power_of_2(t.shape[1]) - t.shape[1])))
    self.table_by_q = pad(table.astype(jnp.int32))      # [nq, nk']
    self.table_by_kv = pad(table.T.astype(jnp.int32))   # [nk, nq']

  def pad(self, x, length):
    """Zero-pads axis 1 of x to `length`."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=jax.default_backend() == "cpu" if interpret is None else interpret, name=name)


def _dot(a, b, contract_a, contract_b):
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _probs_and_dlogits(q, k, v, dout, lse, delta, mask, scale):
  """p = exp(s - lse) and ds = p * (dout·vᵀ - delta) * scale, both (bq, bk) f32."""
  logits = jnp.where(mask, _dot(q, k, 1, 1) * scale, NEG_INF)
  probs = jnp.exp(logits - lse[:, None])
  return probs, probs * (_dot(dout, v, 1, 1) - delta[:, None]) * scale


def _skippable_loop(table_ref, count, update, carry):
  """for step in range(count): carry = update(step, carry) where table_ref[step] != 0."""
  def body(step, carry):
    return lax.cond(table_ref[step] != 0, functools.partial(update, step), lambda c: c, carry)
  return lax.fori_loop(0, count, body, carry)


# --------------------------------------------------------------------------- forward

def _forward_kernel(table_ref, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref,
                    out_ref, lse_ref, *, causal, scale, block_kv, num_kv):
  q = q_ref[...]
  q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]

  def update(j, carry):
    acc, row_max, row_sum = carry
    span = pl.ds(j * block_kv, block_kv)
    mask = masking.visible_broadcast(q_pos, kv_pos_ref[span][None, :], q_seg,
                                     kv_seg_ref[span][None, :], causal)
    logits = jnp.where(mask, _dot(q, k_ref[span, :], 1, 1) * scale, NEG_INF)
    new_max = jnp.maximum(row_max, logits.max(axis=1))
    safe_max = jnp.where(new_max == NEG_INF, 0.0, new_max)  # rows with no key yet
    probs = jnp.exp(logits - safe_max[:, None])
    correction = jnp.exp(row_max - safe_max)
    v = v_ref[span, :]
    acc = correction[:, None] * acc + _dot(probs.astype(v.dtype), v, 1, 0)
    return acc, new_max, correction * row_sum + probs.sum(axis=1)

  rows = q.shape[0]
  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, row_max, row_sum = _skippable_loop(table_ref, num_kv, update, init)
  empty = row_sum == 0
  safe_sum = jnp.where(empty, 1.0, row_sum)
  out_ref[...] = (acc / safe_sum[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(empty, NEG_INF, row_max + jnp.log(safe_sum))


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv",
                                             "interpret"))
def block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale, block_q=BLOCK_Q,
                    block_kv=BLOCK_KV, interpret=None):
  """Forward; see the module docstring. interpret=None: interpret mode on CPU only."""
  batch, q_len, q_heads, head_dim = q.shape
  plan = _Plan(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv)
  bq, group = plan.block_q, plan.group
  q_pos, kv_pos, q_seg, kv_seg = plan.tokens
  kv_head = lambda h: lax.div(h, group)
  in_specs = [
      pl.BlockSpec((None, plan.table_by_q.shape[1]), lambda b, h, i: (i, 0)),
      pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, plan.kv_len, None, head_dim), lambda b, h, i: (b, 0, kv_head(h), 0)),
      pl.BlockSpec((None, plan.kv_len, None, head_dim), lambda b, h, i: (b, 0, kv_head(h), 0)),
      pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
      pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
      pl.BlockSpec((None, plan.kv_len), lambda b, h, i: (b, 0)),
      pl.BlockSpec((None, plan.kv_len), lambda b, h, i: (b, 0)),
  ]
  out_specs = [pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)),
               pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))]
  out_shape = [jax.ShapeDtypeStruct((batch, plan.q_len, q_heads, head_dim), q.dtype),
               jax.ShapeDtypeStruct((batch, q_heads, plan.q_len), jnp.float32)]
  kernel = functools.partial(_forward_kernel, causal=causal, scale=scale,
                             block_kv=plan.block_kv, num_kv=plan.num_kv)
  out, lse = _call(kernel, (batch, q_heads, plan.num_q), in_specs, out_specs, out_shape,
                   interpret, "ringlm_attention_fwd")(
      plan.table_by_q, plan.pad(q, plan.q_len), plan.pad(k, plan.kv_len),
      plan.pad(v, plan.kv_len), q_pos, q_seg, kv_pos, kv_seg)
  return out[:, :q_len], lse.transpose(0, 2, 1)[:, :q_len]


# --------------------------------------------------------------------------- backward

def _dkv_kernel(table_ref, q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, q_pos_ref,
                q_seg_ref, kv_pos_ref, kv_seg_ref, dk_ref, dv_ref, *, causal, scale, block_q,
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
                                       q_seg_ref[span][:, None], kv_seg, causal)
      probs, dlogits = _probs_and_dlogits(q, k, v, dout, lse_ref[g, span], delta_ref[g, span],
                                          mask, scale)
      dv += _dot(probs.astype(dout.dtype), dout, 0, 0)  # pᵀ·dout: (bk, D)
      dk += _dot(dlogits.astype(q.dtype), q, 0, 0)      # dsᵀ·q: (bk, D)
      return dk, dv

    carry = _skippable_loop(table_ref, num_q, update, carry)
  dk_ref[...] = carry[0].astype(dk_ref.dtype)
  dv_ref[...] = carry[1].astype(dv_ref.dtype)


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref, q_pos_ref,
               q_seg_ref, kv_pos_ref, kv_seg_ref, dq_ref, *, causal, scale, block_kv, num_kv):
  q, dout, lse, delta = q_ref[...], dout_ref[...], lse_ref[...], delta_ref[...]
  q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]

  def update(j, dq):
    span = pl.ds(j * block_kv, block_kv)
    k = k_ref[span, :]
    mask = masking.visible_broadcast(q_pos, kv_pos_ref[span][None, :], q_seg,
                                     kv_seg_ref[span][None, :], causal)
    _, dlogits = _probs_and_dlogits(q, k, v_ref[span, :], dout, lse, delta, mask, scale)
    return dq + _dot(dlogits.astype(k.dtype), k, 1, 0)  # ds·k: (bq, D)

  dq = _skippable_loop(table_ref, num_kv, update, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv",
                                             "interpret"))
def block_attention_bwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, *, causal, scale,
                        block_q=BLOCK_Q, block_kv=BLOCK_KV, interpret=None):
  """(dq, dk, dv) of this block's share, from the final out and lse [B, Lq, Hq]."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  plan = _Plan(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_kv)
  bq, bk, group = plan.block_q, plan.block_kv, plan.group
  q_pos, kv_pos, q_seg, kv_seg = plan.tokens

  lse, delta = masking.backward_rows(out, lse, dout)
  # [B, Lq, Hq] -> [B, Hq, Lq_padded]; padding rows get lse = +inf, so p = 0.
  padding = ((0, 0), (0, 0), (0, plan.q_len - q_len))
  lse = jnp.pad(lse.transpose(0, 2, 1), padding, constant_values=jnp.inf)
  delta = jnp.pad(delta.transpose(0, 2, 1), padding)
  operands = (plan.pad(q, plan.q_len), plan.pad(k, plan.kv_len), plan.pad(v, plan.kv_len),
              plan.pad(dout, plan.q_len), lse, delta, q_pos, q_seg, kv_pos, kv_seg)

  # dK/dV: grid (B, Hkv, nk); every query block of the group's heads.
  whole_q = pl.BlockSpec((None, plan.q_len, group, head_dim), lambda b, h, j: (b, 0, h, 0))
  kv_tile = pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0))
  group_rows = pl.BlockSpec((None, group, plan.q_len), lambda b, h, j: (b, h, 0))
  in_specs = [
      pl.BlockSpec((None, plan.table_by_kv.shape[1]), lambda b, h, j: (j, 0)),
      whole_q, kv_tile, kv_tile, whole_q, group_rows, group_rows,
      pl.BlockSpec((None, plan.q_len), lambda b, h, j: (b, 0)),
      pl.BlockSpec((None, plan.q_len), lambda b, h, j: (b, 0)),
      pl.BlockSpec((None, bk), lambda b, h, j: (b, j)),
      pl.BlockSpec((None, bk), lambda b, h, j: (b, j)),
  ]
  kernel = functools.partial(_dkv_kernel, causal=causal, scale=scale, block_q=bq,
                             num_q=plan.num_q, group=group)
  dk, dv = _call(kernel, (batch, kv_heads, plan.num_kv), in_specs, [kv_tile, kv_tile],
                 [jax.ShapeDtypeStruct(operands[1].shape, k.dtype),
                  jax.ShapeDtypeStruct(operands[2].shape, v.dtype)],
                 interpret, "ringlm_attention_dkv")(plan.table_by_kv, *operands)

  # dQ: grid (B, Hq, nq), like the forward.
  q_tile = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
  whole_kv = pl.BlockSpec((None, plan.kv_len, None, head_dim),
                          lambda b, h, i: (b, 0, lax.div(h, group), 0))
  q_rows = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  in_specs = [
      pl.BlockSpec((None, plan.table_by_q.shape[1]), lambda b, h, i: (i, 0)),
      q_tile, whole_kv, whole_kv, q_tile, q_rows, q_rows,
      pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
      pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
      pl.BlockSpec((None, plan.kv_len), lambda b, h, i: (b, 0)),
      pl.BlockSpec((None, plan.kv_len), lambda b, h, i: (b, 0)),
  ]
  kernel = functools.partial(_dq_kernel, causal=causal, scale=scale, block_kv=bk,
                             num_kv=plan.num_kv)
  dq = _call(kernel, (batch, q_heads, plan.num_q), in_specs, q_tile,
             jax.ShapeDtypeStruct(operands[0].shape, q.dtype),
             interpret, "ringlm_attention_dq")(plan.table_by_q, *operands)
  return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
