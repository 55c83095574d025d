"""Per-token log-probabilities of the next token, without a [B, L, V] log-softmax.

  log p(target) = logits[target] - logsumexp(logits)

Training takes minus their sum over real tokens; the evaluation tools score held-out
text with them. Forming the full log-softmax would add a pass over (and, on a long
row, a copy of) the logits, which are the largest activation of the model.
"""

import jax
import jax.numpy as jnp


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
