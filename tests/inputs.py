"""Random attention inputs shared by the kernel and ring tests."""

import numpy as np


def attention_inputs(rng, *, batch=2, q_len=64, kv_len=None, q_heads=4, kv_heads=2, head_dim=16,
                     dtype=np.float32, doc_len=None, kv_offset=0):
  """q, k, v, q_pos, kv_pos, q_seg, kv_seg and a cotangent dout, all fresh random.

  q [B, L, H, D], k/v [B, S, K, D], positions and segment ids [B, L] / [B, S]
  (dimension letters: core/__init__.py).

  doc_len: pack documents of this many tokens per row (segment ids 1, 2, ...; positions
  restart at 0 in each); each row's documents are shifted by a third of a document
  more than the previous row's (row b by b * doc_len // 3), so the rows differ.
  kv_offset: keys' positions start this much later than the queries' (as in a ring
  step), so early query rows may see no key at all.
  """
  kv_len = q_len if kv_len is None else kv_len
  normal = lambda *shape: rng.standard_normal(shape).astype(dtype)
  q, k, v = normal(batch, q_len, q_heads, head_dim), normal(batch, kv_len, kv_heads, head_dim), \
      normal(batch, kv_len, kv_heads, head_dim)
  dout = normal(batch, q_len, q_heads, head_dim)

  def layout(length, offset):
    row_shift = np.arange(batch)[:, None] * (doc_len // 3 if doc_len else 0)
    index = np.arange(length)[None] + offset + row_shift
    if doc_len is None:
      return index.astype(np.int32), np.ones((batch, length), np.int32)
    return (index % doc_len).astype(np.int32), (index // doc_len + 1).astype(np.int32)

  q_pos, q_seg = layout(q_len, 0)
  kv_pos, kv_seg = layout(kv_len, kv_offset)
  return q, k, v, q_pos, kv_pos, q_seg, kv_seg, dout
