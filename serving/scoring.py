"""Scoring rows of tokens: log p(target) and the greedy prediction of every token, through
the model's sharded forward (the evaluation tools' measure)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
                                "targets": pad(np.asarray(targets, np.int32))}, self.mesh)
    log_probs, predictions = self._score(self.state, batch["tokens"], batch["positions"],
                                         batch["targets"])
    return (layout.from_zigzag(np.asarray(log_probs), self.ring)[:rows],
            layout.from_zigzag(np.asarray(predictions), self.ring)[:rows])
