"""Scoring rows of tokens: log p(target) and the greedy prediction of every token, through
the model's sharded forward (the evaluation tools' measure)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import kv_cache
from model.loss import target_log_probs
from parallel import layout, sharding


class Scorer:
  """log p(targets) and greedy predictions of rows [B, L] through the model's forward.

  Rows are laid out batch over (data, fsdp) and tokens over the ring in zigzag order
  (parallel/sharding.put_batch); one compilation per (B, L). B is padded up to a
  multiple of the data shards.
  """

  def __init__(self, model, mesh):
    self.mesh = mesh
    self.ring = mesh.shape["sequence"]
    self.data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    graphdef, self.state = nnx.split(model)

    @jax.jit
    def score(state, tokens, positions, targets):
      logits = nnx.merge(graphdef, state)(tokens, positions)
      return target_log_probs(logits, targets), jnp.argmax(logits, -1).astype(jnp.int32)

    self._score = score

  def __call__(self, tokens: np.ndarray, targets: np.ndarray):
    """tokens, targets [B, L] int -> (log p(target) [B, L] float32, argmax [B, L] int32),
    host arrays in natural order."""
    rows, length = tokens.shape
    padded = -(-rows // self.data_shards) * self.data_shards
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], padded - rows, 0)]) if padded > rows \
        else x
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (padded, length))
    batch = sharding.put_batch({"tokens": pad(np.asarray(tokens, np.int32)),
                                "positions": positions,
                                "targets": pad(np.asarray(targets, np.int32))}, self.mesh,
                               order="zigzag" if self.ring > 1 else "natural")
    log_probs, predictions = self._score(self.state, batch["tokens"], batch["positions"],
                                         batch["targets"])
    return (layout.from_zigzag(np.asarray(log_probs), self.ring)[:rows],
            layout.from_zigzag(np.asarray(predictions), self.ring)[:rows])


class CacheScorer(Scorer):
  """Scorer whose scores of the second half of every row go through the KV cache, as
  serving computes them: the first half is prefilled (its scores from that forward) into
  a cache of model.kv_cache_dtype (kv_cache.from_prefill), then the second half is fed
  one token per step as decode does (teacher forcing), each step attending over the
  cache. An int8 cache's rounding is then in the scores (tools/eval_ppl
  --through_cache). Rows in natural order; B padded to the data shards."""

  def __init__(self, model, mesh):
    self.mesh = mesh
    self.ring = 1  # natural order (the ring attends by position; its order is free)
    self.data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    graphdef, self.state = nnx.split(model)
    cache_dtype = kv_cache.cache_dtype(model.config)

    @jax.jit
    def score(state, tokens, positions, targets):
      model = nnx.merge(graphdef, state)
      half = tokens.shape[1] // 2
      hidden, layer_kv = model.forward(tokens[:, :half], positions[:, :half])
      prompt = target_log_probs(model.head(hidden), targets[:, :half])
      cache = kv_cache.from_prefill(layer_kv, positions[:, :half],
                                    jnp.ones_like(tokens[:, :half], bool),
                                    tokens.shape[1] - half, mesh, cache_dtype)

      def step(cache, inputs):
        token, position, target = (x[:, None] for x in inputs)  # [B, 1]
        hidden, cache = model.forward(token, position, cache=cache)
        return cache, target_log_probs(model.head(hidden), target)[:, 0]

      columns = lambda x: jnp.swapaxes(x[:, half:], 0, 1)  # [L - half, B]
      _, decoded = jax.lax.scan(step, cache, (columns(tokens), columns(positions),
                                              columns(targets)))
      scores = jnp.concatenate([prompt, jnp.swapaxes(decoded, 0, 1)], axis=1)
      return scores, jnp.zeros_like(tokens)  # (no greedy predictions)

    self._score = score

  def __call__(self, tokens: np.ndarray, targets: np.ndarray):
    """tokens, targets [B, L] int, L even -> (log p(target) [B, L] float32, zeros)."""
    if tokens.shape[1] % 2:
      raise ValueError(f"rows of {tokens.shape[1]} tokens: CacheScorer needs an even length")
    return super().__call__(tokens, targets)
