"""Float64 NumPy attention: the oracle every kernel and the ring are tested against.

Dimension letters: core/__init__.py.

Shapes follow the block-attention contract (docs/design.md, "The block contract"):
  q [B, L, H, D], k/v [B, S, K, D] with H % K == 0 (query head h reads kv head
  h // G, G = H // K); positions and segment ids [B, L] / [B, S] int.
A query sees a key when their segment ids are equal and, if causal,
kv_pos <= q_pos; with a sliding window W > 0 also q_pos - W < kv_pos, unless the key
is one of the first `sinks` positions (kv_pos < sinks). Rows that see no key have
out = 0 and lse = -inf.

The backward is written out by hand (no autodiff), so it is an independent
check of every implementation's gradients.
"""

import numpy as np


def _visible(q_pos, kv_pos, q_seg, kv_seg, causal, window, sinks):
  """[B, 1, L, S] boolean mask (positions compared in int64: no overflow)."""
  q_pos, kv_pos = q_pos.astype(np.int64)[:, :, None], kv_pos.astype(np.int64)[:, None, :]
  mask = q_seg[:, :, None] == kv_seg[:, None, :]
  if causal:
    mask &= kv_pos <= q_pos
  if window:
    mask &= (q_pos - kv_pos < window) | (kv_pos < sinks)
  return mask[:, None]


def _scores(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, scale, window, sinks):
  """Masked logits [B, H, L, S] (-inf where masked)."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  group = q.shape[2] // k.shape[2]
  k = np.repeat(k, group, axis=2)  # [B, S, K, D] -> [B, S, H, D]
  logits = np.einsum("blhd,bshd->bhls", q, k) * scale
  mask = _visible(np.asarray(q_pos), np.asarray(kv_pos), np.asarray(q_seg),
                  np.asarray(kv_seg), causal, window, sinks)
  return np.where(mask, logits, -np.inf)


def attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal=True, scale=None, window=0,
              sinks=0):
  """Returns (out [B, L, H, D] float64, lse [B, L, H] float64)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = _scores(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, scale, window, sinks)
  row_max = np.max(logits, axis=-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  weights = np.exp(logits - row_max)  # exactly 0 where masked
  total = weights.sum(-1, keepdims=True)
  probs = weights / np.where(total > 0, total, 1.0)
  with np.errstate(divide="ignore"):
    lse = np.where(total > 0, np.log(total) + row_max, -np.inf)[..., 0]
  group = q.shape[2] // k.shape[2]
  v = np.repeat(np.asarray(v, np.float64), group, axis=2)
  out = np.einsum("bhls,bshd->blhd", probs, v)
  return out, lse.transpose(0, 2, 1)


def attention_grads(q, k, v, q_pos, kv_pos, q_seg, kv_seg, dout, *, causal=True,
                    scale=None, window=0, sinks=0):
  """Gradients (dq, dk, dv) of sum(out * dout), in float64, by the textbook formulas."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  batch, kv_len, kv_heads, head_dim = k.shape
  group = q.shape[2] // kv_heads
  logits = _scores(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, scale, window, sinks)
  out, lse = attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal=causal, scale=scale,
                       window=window, sinks=sinks)
  lse_bhl = lse.transpose(0, 2, 1)[..., None]
  probs = np.where(np.isfinite(lse_bhl), np.exp(logits - np.where(np.isfinite(lse_bhl), lse_bhl, 0.0)), 0.0)
  dout = np.asarray(dout, np.float64)
  v_rep = np.repeat(np.asarray(v, np.float64), group, axis=2)
  k_rep = np.repeat(np.asarray(k, np.float64), group, axis=2)
  dv_rep = np.einsum("bhls,blhd->bshd", probs, dout)
  dprobs = np.einsum("blhd,bshd->bhls", dout, v_rep)
  delta = np.einsum("blhd,blhd->bhl", dout, out)[..., None]
  dlogits = probs * (dprobs - delta)
  dq = np.einsum("bhls,bshd->blhd", dlogits, k_rep) * scale
  dk_rep = np.einsum("bhls,blhd->bshd", dlogits, np.asarray(q, np.float64)) * scale
  # Sum the gradients of the q heads that share a kv head.
  dk = dk_rep.reshape(batch, kv_len, kv_heads, group, head_dim).sum(3)
  dv = dv_rep.reshape(batch, kv_len, kv_heads, group, head_dim).sum(3)
  return dq, dk, dv
