"""What the block-attention kernels share besides masks: the online softmax, the
backward's per-block probabilities, rounding, the f32 matmul and the jit of the
entry points.

Dimension letters: core/__init__.py.

Row statistics (the running max and sum, lse, delta) come in either of two forms,
whichever a kernel keeps: vectors, the shape of the logits without the key axis
(xla.py, pallas_gpu.py), or columns, that shape with a key axis of 1 (pallas_tpu.py,
whose (bq, 128) scratch reads as (bq, 1)). `column` makes either broadcast against
the logits [..., keys].
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -jnp.inf


def kernel_jit(*more_static):
  """jax.jit of `block_attention` / `block_attention_bwd`: the mask and block options
  (causal, window, sinks, scale, block_q, block_kv) and the names in `more_static` are
  static."""
  return functools.partial(jax.jit, static_argnames=("causal", "window", "sinks", "scale",
                                                     "block_q", "block_kv") + more_static)


def interpret_mode(interpret):
  """Whether a Pallas kernel runs in interpret mode: `interpret`, or None for on CPU only."""
  return jax.default_backend() == "cpu" if interpret is None else interpret


def round_up(x, multiple):
  return -(-x // multiple) * multiple


def dot(a, b, contract_a, contract_b):
  """a·b contracting axis `contract_a` of a with axis `contract_b` of b, in float32."""
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def column(stat, like):
  """A row statistic (vector or column, see the module docstring) that broadcasts against
  `like` [..., keys or D]."""
  return stat if stat.ndim == like.ndim else stat[..., None]


def softmax_update(row_max, row_sum, logits):
  """One online-softmax step: folds a block of logits [..., keys] into the running row
  max and sum. Returns (new_max, new_sum, probs, correction): probs = exp(logits - max)
  in float32, and the accumulator's update is acc·correction + probs·v (correction is a
  column)."""
  keepdims = row_max.ndim == logits.ndim
  new_max = jnp.maximum(row_max, logits.max(axis=-1, keepdims=keepdims))
  safe_max = jnp.where(new_max == NEG_INF, 0.0, new_max)  # rows with no key yet
  probs = jnp.exp(logits - column(safe_max, logits))
  correction = jnp.exp(row_max - safe_max)
  new_sum = correction * row_sum + probs.sum(axis=-1, keepdims=keepdims)
  return new_max, new_sum, probs, column(correction, logits)


def softmax_finish(acc, row_max, row_sum):
  """(out, lse) from the accumulator [..., D] and the final row max and sum: out =
  acc / sum in float32; rows that saw no key get out = 0 and lse = -inf."""
  empty = row_sum == 0
  safe_sum = jnp.where(empty, 1.0, row_sum)
  lse = jnp.where(empty, NEG_INF, row_max + jnp.log(safe_sum))
  return acc / column(safe_sum, acc), lse


def probs_and_dlogits(q, k, v, dout, lse, delta, mask, scale):
  """p = exp(s - lse) and ds = p * (dout·vᵀ - delta) * scale, both (bq, bk) f32, from
  q, dout (bq, D), k, v (bk, D) and lse, delta row statistics of the bq rows."""
  logits = jnp.where(mask, dot(q, k, 1, 1) * scale, NEG_INF)
  probs = jnp.exp(logits - column(lse, logits))
  dprobs = dot(dout, v, 1, 1)
  return probs, probs * (dprobs - column(delta, logits)) * scale
