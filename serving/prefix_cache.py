"""Prefix caching: the KV of prompt prefixes kept after their requests end, so a request that
starts with the same tokens (ten questions about one long document) prefills only the
rest.

Prefixes match in whole blocks of `block` tokens (serve.prefix_block). When a request's
prompt has been prefilled, the staging row's first n slots (n: the prompt's whole
blocks) are copied out (serving/slots.py, `take_prefix`; n rounded up to a power-of-two
bucket of slots, so that few programs serve every length) and kept under the hash of
each of its block prefixes. A request about to prefill looks up its own block
prefixes, longest first; on a hit of m tokens the kept slots are copied into the
staging row (`put_prefix`) and its prefill starts at token m. Slot g of a row holds
token g of the prompt (chunks write in order), so the first m slots are exactly the
prefix's keys and values; the chunk that follows clears every slot after m.

Entries are evicted least recently used once their bytes pass the budget
(serve.prefix_cache_mb). Kept slots are device arrays sharded as the cache is.
"""

import collections
import hashlib

import numpy as np


def _block_hashes(tokens, block: int) -> list[str]:
  """The hash of every whole-block prefix of `tokens`, shortest first."""
  digest, hashes = hashlib.sha256(), []
  for start in range(0, len(tokens) - len(tokens) % block, block):
    digest.update(np.asarray(tokens[start:start + block], np.int32).tobytes())
    hashes.append(digest.copy().hexdigest())
  return hashes


class PrefixCache:
  """LRU of prompt prefixes' KV; see the module docstring.

  Args:
    block: tokens per block, a multiple of the ring size.
    budget_bytes: most bytes kept.
    metrics: a serving/metrics.ServerMetrics (lookups, hits, bytes), or None.
  """

  def __init__(self, block: int, budget_bytes: int, metrics=None):
    self.block, self.budget, self.metrics = block, budget_bytes, metrics
    self.entries = collections.OrderedDict()  # hash of the prefix -> (bytes, slots, hashes)
    self.index = {}   # hash of any block prefix -> hash of an entry holding it
    self.bytes = 0

  def restore(self, engine, prompt) -> int:
    """Copies the longest cached prefix of `prompt` into the engine's staging row;
    returns its length in tokens (0: none). At least one prompt token is always left to prefill (its logits
    give the first token)."""
    if self.metrics is not None:
      self.metrics.prefix_lookups.inc()
    hashes = _block_hashes(prompt[:len(prompt) - 1], self.block)
    for count in range(len(hashes), 0, -1):
      key = self.index.get(hashes[count - 1])
      if key is None or key not in self.entries:
        continue
      self.entries.move_to_end(key)
      tokens = count * self.block
      engine.put_prefix(self.entries[key][1])
      if self.metrics is not None:
        self.metrics.prefix_hits.inc()
        self.metrics.prefix_hit_tokens.inc(tokens)
      return tokens
    return 0

  def store(self, engine, prompt) -> None:
    """Keeps the whole blocks of `prompt`, just prefilled into the staging row."""
    hashes = _block_hashes(prompt, self.block)
    if not hashes or hashes[-1] in self.entries:
      if hashes:
        self.entries.move_to_end(hashes[-1])
      return
    kept = engine.prefix_bucket(len(hashes) * self.block)  # slots kept (a bucket)
    size = kept * engine.per_token_bytes
    if size > self.budget:
      return
    while self.entries and self.bytes + size > self.budget:
      old, (old_size, _, old_hashes) = self.entries.popitem(last=False)
      self.bytes -= old_size
      for key in old_hashes:
        if self.index.get(key) == old:
          del self.index[key]
    self.entries[hashes[-1]] = (size, engine.take_prefix(kept), hashes)
    self.bytes += size
    for key in hashes:
      self.index[key] = hashes[-1]
    if self.metrics is not None:
      self.metrics.prefix_cache_bytes.set(self.bytes)
