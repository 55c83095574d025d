"""Load-balanced (zigzag) sequence order for causal ring attention.

With causal attention in natural order, the device holding the last chunk of the
sequence does N times the work of the device holding the first. Zigzag order splits
the sequence into 2N chunks and gives sequence shard i the chunks i and 2N-1-i, so
every shard holds one early and one late chunk and does the same amount of work.

Masks come from positions, so attention is correct in any order; this module only
decides which order the tokens are laid out in. A model whose every layer has a
sliding window (and no sink tokens) keeps natural order (`order_for`): its work is
even without zigzag, and in natural order the ring stops once the window is covered
(docs/design.md, "Sliding windows on the ring"). Permute tokens, positions, segment
ids and targets with `to_zigzag` before the step (host side, free); the per-token
outputs come back in the same order and `from_zigzag` restores natural order.
"""

import numpy as np


def zigzag_indices(seq_len: int, num_shards: int) -> np.ndarray:
  """Index array `idx` [seq_len] such that `x[..., idx]` is x in zigzag order."""
  if seq_len % (2 * num_shards):
    raise ValueError(f"sequence length {seq_len} must be a multiple of 2*{num_shards} "
                     "for the zigzag layout")
  chunks = np.arange(seq_len).reshape(2 * num_shards, seq_len // (2 * num_shards))
  order = [c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)]
  return chunks[order].reshape(-1)


def order_for(model_config) -> str:
  """"natural" for a model windowed on every layer without sinks, else "zigzag"."""
  return ("natural" if model_config.windowed_everywhere and not model_config.sink_tokens
          else "zigzag")


def to_zigzag(x, num_shards: int, axis: int = 1):
  """Reorders `x` (NumPy or jax array) along `axis` (the sequence axis) into zigzag order;
  a ring of one device keeps the natural order (any length)."""
  if num_shards == 1:
    return x
  return x.take(zigzag_indices(x.shape[axis], num_shards), axis=axis)


def from_zigzag(x, num_shards: int, axis: int = 1):
  """Inverse of `to_zigzag`."""
  if num_shards == 1:
    return x
  return x.take(np.argsort(zigzag_indices(x.shape[axis], num_shards)), axis=axis)
