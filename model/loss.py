"""Per-token log-probabilities of the next token, without a [B, L, V] log-softmax.

  log p(target) = logits[target] - logsumexp(logits)

Training takes minus their sum over real tokens; the evaluation tools score held-out
text with them. `chunked_target_log_probs` forms the logits a chunk of tokens at a time
(model.head_chunk), for long rows whose [tokens, V] logits would not fit. Forming the full log-softmax would add a pass over (and, on a long
row, a copy of) the logits, which are the largest activation of the model.
"""

import jax
import jax.numpy as jnp

from model.matmul import project
from parallel import sharding


def target_log_probs(logits, targets):
  """log softmax(logits)[target] of every token.

  Args:
    logits: [B, L, V] float32, any sharding (batch over (data, fsdp), L over the ring).
    targets: [B, L] int32 token ids in [0, V), sharded like the logits' first two axes.
  Returns:
    [B, L] float32 log-probabilities, sharded like `targets`. A target outside the
    vocabulary gives NaN (training then skips the step).
  """
  target_logits = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return target_logits - jax.nn.logsumexp(logits, axis=-1)


def chunked_target_log_probs(hidden, head, targets, *, chunk: int, mesh, dtype):
  """`target_log_probs(hidden · headᵀ, targets)` without the whole [B, L, V] logits.

  Each device's tokens are taken `chunk` at a time: a chunk's logits are formed in
  float32, reduced to log-probabilities and dropped, and recomputed in the backward pass
  (jax.checkpoint), so at most one chunk of logits per device is alive. The chunks
  travel in step over the ring: chunk j is tokens [j·chunk, (j+1)·chunk) of every
  device's share, so no token changes device.

  Args:
    hidden: [B, L, M] after the final norm, sharded (batch, sequence, -).
    head: [V, M] output head (vocab over tensor, embed over fsdp).
    targets: [B, L] int32, sharded like hidden's first two axes.
    chunk: tokens per device per chunk; must divide L / N (N: mesh.sequence).
    mesh: the Mesh (or None: one device); dtype: the compute dtype of the head matmul.
  Returns:
    [B, L] float32 log-probabilities, as `target_log_probs`.
  """
  batch, length, dim = hidden.shape
  ring = mesh.shape["sequence"] if mesh is not None else 1
  chunks = length // ring // chunk

  def split(x):  # [B, L, ...] -> [chunks, B, N·chunk, ...]: chunk j of every device
    x = x.reshape(batch, ring, chunks, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 2, 0).reshape(chunks, batch, ring * chunk, *x.shape[4:])

  hidden = sharding.constrain(split(hidden), mesh, (None, "batch", "sequence", "act_embed"))
  targets = sharding.constrain(split(targets), mesh, (None, "batch", "sequence"))

  @jax.checkpoint
  def one_chunk(args):
    hidden, targets = args
    logits = project("blm,vm->blv", hidden.astype(dtype), head, jnp.float32)
    logits = sharding.constrain(logits, mesh, ("batch", "sequence", "vocab"))
    return target_log_probs(logits, targets)

  log_probs = jax.lax.map(one_chunk, (hidden, targets))  # [chunks, B, N·chunk]
  log_probs = jnp.moveaxis(log_probs.reshape(chunks, batch, ring, chunk), 0, 2)
  return log_probs.reshape(batch, length)
