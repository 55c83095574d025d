"""The next token of every row (inside jit): greedy, or temperature / top-k / top-p
sampling with per-request seeds."""

import jax
import jax.numpy as jnp

def sample(logits, temperature, top_k, top_p, seeds, token_index, *, sampling: bool):
  """The next token of each row and its log-probability under the model.

  Args:
    logits: [B, V] float32.
    temperature, top_p: [B] float32; top_k: [B] int32 (0: no limit); seeds: [B] uint32.
    token_index: [B] int32, the index of the token being generated (with the seed it
      makes the row's random key, so a request samples the same tokens in any batch).
    sampling: False when every row is greedy (argmax only: nothing else is compiled);
      True compiles the sampler too, and it runs only when some row's temperature is
      above 0 (lax.cond), so one program serves greedy and sampled batches at greedy
      speed for the first.
  Returns:
    (tokens [B] int32, log p(token) [B] float32 under softmax(logits)).
  """
  # Greedy: the first index of the maximum (as jnp.argmax, whose variadic reduce runs
  # ~3x slower on CPU than these plain reductions).
  vocab = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = jnp.arange(vocab, dtype=jnp.int32)
  tokens = jnp.minimum(jnp.min(jnp.where(logits == top, index, vocab), axis=-1), vocab - 1)
  log_normalizer = top[:, 0] + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
  if sampling:
    tokens = jax.lax.cond(jnp.any(temperature > 0), _sampled, lambda *operands: operands[-1],
                          logits, temperature, top_k, top_p, seeds, token_index, tokens)
  return tokens, jnp.take_along_axis(logits, tokens[:, None], -1)[:, 0] - log_normalizer


def _sampled(logits, temperature, top_k, top_p, seeds, token_index, greedy):
  """sample's tokens when some row samples (rows at temperature 0 keep `greedy`)."""
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
  descending = -jnp.sort(-scaled, axis=-1)
  kth = jnp.take_along_axis(descending, (jnp.clip(top_k, 1, vocab) - 1)[:, None], -1)
  kth = jnp.where(top_k[:, None] > 0, kth, -jnp.inf)
  descending = jnp.where(descending >= kth, descending, -jnp.inf)
  # top-p: the smallest head of the (top-k) distribution whose mass reaches p
  cumulative = jnp.cumsum(jax.nn.softmax(descending, axis=-1), axis=-1)
  cut = jnp.sum(cumulative < top_p[:, None], axis=-1, keepdims=True)
  threshold = jnp.maximum(kth, jnp.take_along_axis(descending, jnp.minimum(cut, vocab - 1), -1))
  masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
  keys = jax.vmap(lambda seed, index: jax.random.fold_in(jax.random.key(seed), index))(
      seeds, token_index)
  sampled = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def decode_step(model, cache, token, position, params, token_index, eos, max_tokens, done, *,
                sampling: bool):
  """One decode step of every row (inside jit), shared by serving/engine.py and
  serving/slots.py: the forward of `token` [B] at `position` [B] with `cache`, the next
  token sampled (params: temperature, top_k, top_p, seeds, each [B]; token_index [B]
  the index of the token being generated). A row is done once it was, or it drew an
  id in `eos`, or it reached `max_tokens` [B].
  Returns (next token [B], its log-probability [B], cache, done [B])."""
  hidden, cache = model.forward(token[:, None], position[:, None], cache=cache)
  next_token, logprob = sample(model.head(hidden)[:, 0], *params, token_index,
                               sampling=sampling)
  done = done | jnp.isin(next_token, eos) | (token_index + 1 >= max_tokens)
  return next_token, logprob, cache, done
