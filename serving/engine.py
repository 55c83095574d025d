"""The inference engine: batches of requests through the training forward, prefill then
decode, on any mesh.

- Prefill is `Transformer.forward`, the training forward with its shardings: on a mesh
  with sequence > 1 a long prompt is attended with ring attention, its tokens in zigzag
  order spread over the ring, and the keys/values it computes stay where they are as
  the KV cache (model/kv_cache.py).
- Decode is the same forward with the cache, one token per row per step, inside a
  compiled `lax.while_loop` of up to `decode_chunk` steps that stops when every row is
  done; sampling (serving/sampling.py) runs inside it.
- Requests are grouped by (prompt bucket, decode bucket), powers of two, into batches
  of up to `batch_size` rows, so there is one prefill and one decode compilation per
  bucket pair and batch size. `Engine.compile` needs only the parameters' shapes, so a
  caller can compile while the checkpoint loads.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import kv_cache, transformer
from parallel import layout, ring, sharding
from serving.completion import Completion
from serving.requests import error_record
from serving.sampling import decode_step, sample


def _bucket(n: int, minimum: int, multiple: int) -> int:
  """The smallest power of two >= max(n, minimum), rounded up to a multiple of `multiple`."""
  size = 1 << max(n - 1, minimum - 1, 0).bit_length()
  return -(-size // multiple) * multiple


class Engine:
  """Prefill + decode of batches of requests on a mesh; see the module docstring.

  `model` is a Transformer whose parameters live on `mesh` (transformer.load). Counts
  compilations (`compilations`) and times prefill, decode and compilation (`stats`).
  """

  def __init__(self, model, mesh, *, tokenizer=None, eos_ids=(), batch_size=32,
               min_bucket=16, decode_chunk=32):
    self.model, self.mesh, self.tokenizer = model, mesh, tokenizer
    self.eos_ids = tuple(sorted({int(e) for e in eos_ids if e is not None and e >= 0}))
    self.batch_size, self.min_bucket, self.decode_chunk = batch_size, min_bucket, decode_chunk
    self.ring = mesh.shape["sequence"]
    self.data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    self.graphdef, state = nnx.split(model)
    # as serving holds it (the caller's model unchanged)
    self.state = transformer.serving_layout(state, ring.platform_of(mesh))
    self._compiled = {}
    self.compilations = 0
    self.stats = dict(compile_s=0.0, prefill_s=0.0, decode_s=0.0, prefill_tokens=0,
                      decode_tokens=0)

  # Buckets: prompt lengths are multiples of 2*ring (zigzag), decode room of the ring.
  def prompt_bucket(self, length: int) -> int:
    return _bucket(length, self.min_bucket, 2 * self.ring)

  def room_bucket(self, max_tokens: int) -> int:
    return _bucket(max(max_tokens - 1, 1), 1, self.ring)

  def _rows_bucket(self, rows: int) -> int:
    return _bucket(rows, self.data_shards, self.data_shards)

  def _compile(self, name, function, args, static, donate=()):
    """An executable per (name, shapes, static arguments), compiled ahead of time so that
    compilation is timed (and counted) apart from running. `donate`: indices of
    arguments whose buffers the outputs may reuse (the KV cache, updated in place)."""
    key = (name, static, tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args)))
    if key not in self._compiled:
      start = time.perf_counter()
      self._compiled[key] = jax.jit(functools.partial(function, **dict(static)),
                                    donate_argnums=donate).lower(*args).compile()
      self.stats["compile_s"] += time.perf_counter() - start
      self.compilations += 1
    return self._compiled[key]

  def _prefill_fn(self, state, tokens, positions, valid, last_index, params, *, room, sampling):
    model = nnx.merge(self.graphdef, state)
    hidden, layer_kv = model.forward(tokens, positions, jnp.where(valid, 0, 1))
    last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)  # [B, 1, M]
    logits = model.head(last)[:, 0]
    cache = kv_cache.from_prefill(layer_kv, positions, valid, room, self.mesh,
                                  kv_cache.cache_dtype(model.config))
    first, logprob = sample(logits, *params, jnp.zeros_like(last_index), sampling=sampling)
    return first, logprob, cache

  def _decode_fn(self, state, cache, token, position, done, generated, max_tokens, params, *,
                 steps, sampling):
    """Up to `steps` decode steps, stopping early when every row is done. Row i's
    step feeds `token[i]` (at `position[i]`) and samples its next token."""
    model = nnx.merge(self.graphdef, state)
    eos = jnp.asarray(self.eos_ids or (-1,), jnp.int32)
    rows = token.shape[0]

    def cond(carry):
      i, cache, _, _, done, _, _ = carry
      return (i < steps) & ~jnp.all(done) & (cache.step < cache.capacity - cache.prompt_slots)

    def body(carry):
      i, cache, token, position, done, out_tokens, out_logprobs = carry
      next_token, logprob, cache, done = decode_step(
          model, cache, token, position, params, generated + i, eos, max_tokens, done,
          sampling=sampling)
      out_tokens = out_tokens.at[:, i].set(next_token)
      out_logprobs = out_logprobs.at[:, i].set(logprob)
      return i + 1, cache, next_token, position + 1, done, out_tokens, out_logprobs

    carry = (jnp.zeros((), jnp.int32), cache, token, position, done,
             jnp.zeros((rows, steps), jnp.int32), jnp.zeros((rows, steps), jnp.float32))
    steps_done, cache, _, _, _, out_tokens, out_logprobs = jax.lax.while_loop(cond, body, carry)
    return steps_done, cache, out_tokens, out_logprobs

  def batches(self, requests: list) -> list:
    """[(prompt bucket, decode-room bucket, requests)]: batches of at most batch_size
    requests that share both buckets."""
    groups = {}
    for request in requests:
      key = (self.prompt_bucket(len(request.prompt_tokens)), self.room_bucket(request.max_tokens))
      groups.setdefault(key, []).append(request)
    return [(prompt_len, room, group[start:start + self.batch_size])
            for (prompt_len, room), group in sorted(groups.items())
            for start in range(0, len(group), self.batch_size)]

  def compile(self, requests: list) -> None:
    """Compiles, without running, what serving `requests` takes. Needs only the
    parameters' shapes and shardings: an Engine built on an abstract model
    (`nnx.eval_shape`, or transformer.abstract) compiles while the checkpoint loads;
    `use_parameters` then brings the real ones."""
    for prompt_len, room, batch in self.batches(requests):
      try:
        args, sampling, lengths = self._prefill_inputs(batch, prompt_len)
        _, _, cache = self._prefill_executable(args, room, sampling).out_info
        zeros = lambda dtype: np.zeros(len(lengths), dtype)
        self._decode_executable(cache, zeros(np.int32), zeros(np.int32), zeros(bool),
                                zeros(np.int32), zeros(np.int32), args[-1], sampling)
      except Exception:  # noqa: BLE001 (generate compiles it again and reports the error
        continue         # on the batch's lines)

  def use_parameters(self, model) -> None:
    """Serves with `model`'s parameters (the same shapes and shardings as the model
    the engine was built with), held as transformer.serving_layout says from then on
    (in place: no second copy)."""
    transformer.hold_serving_layout(model)
    self.model, self.state = model, nnx.split(model)[1]

  def generate(self, requests: list, progress=None) -> dict:
    """Serves `requests`; returns {line: result dict}. A batch that fails (e.g. out of
    memory) gives its lines error results; the other batches are still served."""
    results = {}
    for prompt_len, room, batch in self.batches(requests):
      try:
        for row in self._generate_batch(batch, prompt_len, room):
          results[row.request.line] = self._result(row)
      except Exception as error:  # noqa: BLE001 (the batch's lines report it)
        message = f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"
        for request in batch:
          results[request.line] = error_record(request.line, request.id, message, status=500)
      if progress is not None:
        progress.update(len(batch))
    return results

  def _result(self, row: Completion) -> dict:
    request = row.request
    result = {"line": request.line, "id": request.id, "completion": row.completion,
              "tokens": row.tokens, "finish_reason": row.finish_reason,
              "prompt_tokens": len(request.prompt_tokens)}
    if request.logprobs:
      result["logprobs"] = row.logprobs
    return result

  def _rows(self, array):
    """[rows] host array -> global array split over the batch axes."""
    return sharding.put_rows(array, self.mesh, ("batch",))

  def _prefill_inputs(self, batch: list, prompt_len: int):
    """(prefill arguments, sampling, prompt lengths [rows]) of a batch, padded to the
    rows bucket with copies of its last request (ignored). The arguments end with the
    per-row sampling parameters (temperature, top_k, top_p, seed)."""
    size = self._rows_bucket(len(batch))
    padded = batch + [batch[-1]] * (size - len(batch))
    tokens = np.zeros((size, prompt_len), np.int32)
    valid = np.zeros((size, prompt_len), bool)
    for i, request in enumerate(padded):
      tokens[i, :len(request.prompt_tokens)] = request.prompt_tokens
      valid[i, :len(request.prompt_tokens)] = True
    lengths = valid.sum(1).astype(np.int32)
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), tokens.shape)
    # The prompt's tokens in zigzag order over the ring; the last prompt token's index there.
    order = layout.to_zigzag(np.arange(prompt_len)[None], self.ring)[0]
    last_index = np.argsort(order)[lengths - 1].astype(np.int32)
    prompt = sharding.put_batch({"tokens": tokens, "positions": positions, "valid": valid},
                                self.mesh)
    params = tuple(self._rows(np.array([getattr(r, field) for r in padded], dtype))
                   for field, dtype in (("temperature", np.float32), ("top_k", np.int32),
                                        ("top_p", np.float32), ("seed", np.uint32)))
    sampling = any(r.temperature > 0 for r in batch)
    args = (self.state, prompt["tokens"], prompt["positions"], prompt["valid"],
            self._rows(last_index), params)
    return args, sampling, lengths

  def _prefill_executable(self, args, room: int, sampling: bool):
    return self._compile("prefill", self._prefill_fn, args,
                         (("room", room), ("sampling", sampling)))

  def _decode_executable(self, cache, token, position, done, generated, max_tokens, params,
                         sampling):
    """(decode executable, its arguments); the row arrays are [rows] numpy arrays, or
    jax.ShapeDtypeStructs with their shardings (`compile_shapes`)."""
    place = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else self._rows(x)
    args = (self.state, cache, *(place(x) for x in
                                 (token, position, done, generated, max_tokens)), params)
    return self._compile("decode", self._decode_fn, args,
                         (("steps", self.decode_chunk), ("sampling", sampling)),
                         donate=(1,)), args

  def compile_shapes(self, rows: int, prompt_len: int, max_tokens: int,
                     sampling: bool = False) -> dict:
    """{"prefill", "decode"}: the compiled programs that serve `rows` requests of
    `prompt_len` prompt tokens and up to `max_tokens` new ones, from shapes alone (no
    array is made, so the mesh may hold compile-only devices: tools/aot.py --serve).
    Shardings as `generate` gives them: prompt arrays ("batch", "sequence"), per-row
    arrays ("batch",)."""
    rows, prompt_len = self._rows_bucket(rows), self.prompt_bucket(prompt_len)
    room = self.room_bucket(max_tokens)
    shape = lambda dims, dtype, axes: jax.ShapeDtypeStruct(
        dims, dtype, sharding=sharding.named_sharding(self.mesh, axes))
    prompt = [shape((rows, prompt_len), dtype, ("batch", "sequence"))
              for dtype in (jnp.int32, jnp.int32, jnp.bool_)]
    row = lambda dtype: shape((rows,), dtype, ("batch",))
    params = tuple(row(dtype) for dtype in (jnp.float32, jnp.int32, jnp.float32, jnp.uint32))
    prefill = self._prefill_executable((self.state, *prompt, row(jnp.int32), params), room,
                                       sampling)
    cache = prefill.out_info[2]
    decode, _ = self._decode_executable(cache, row(jnp.int32), row(jnp.int32), row(jnp.bool_),
                                        row(jnp.int32), row(jnp.int32), params, sampling)
    return {"prefill": prefill, "decode": decode}

  def _generate_batch(self, batch: list, prompt_len: int, room: int) -> list:
    rows = [Completion(request) for request in batch]
    args, sampling, lengths = self._prefill_inputs(batch, prompt_len)
    prefill = self._prefill_executable(args, room, sampling)
    params, size = args[-1], len(lengths)
    start = time.perf_counter()
    first, first_logprob, cache = prefill(*args)
    first, first_logprob = np.asarray(first), np.asarray(first_logprob)
    self.stats["prefill_s"] += time.perf_counter() - start
    self.stats["prefill_tokens"] += int(lengths[:len(batch)].sum())

    max_tokens = np.ones(size, np.int32)  # padding rows are done from the start
    max_tokens[:len(batch)] = [r.max_tokens for r in batch]
    done = np.zeros(size, bool)
    done[len(batch):] = True
    for i, row in enumerate(rows):
      done[i] = self._append(row, [int(first[i])], [float(first_logprob[i])])
    token, position = first.astype(np.int32), lengths.copy()
    generated = np.ones(size, np.int32)
    start, compile_start = time.perf_counter(), self.stats["compile_s"]
    while not done.all():
      decode, args = self._decode_executable(cache, token, position, done, generated,
                                             max_tokens, params, sampling)
      steps, cache, out_tokens, out_logprobs = decode(*args)
      steps, out_tokens, out_logprobs = (int(steps), np.asarray(out_tokens),
                                         np.asarray(out_logprobs))
      if steps == 0:  # cannot happen while a row has room; never loop forever
        raise RuntimeError("decode made no progress")
      for i, row in enumerate(rows):
        if not done[i]:
          done[i] = self._append(row, out_tokens[i, :steps].tolist(),
                                 out_logprobs[i, :steps].tolist())
      token, position, generated = out_tokens[:, steps - 1], position + steps, generated + steps
    self.stats["decode_s"] += (time.perf_counter() - start
                               - (self.stats["compile_s"] - compile_start))  # run time only
    self.stats["decode_tokens"] += sum(max(len(row.tokens) - 1, 0) for row in rows)
    return rows

  def _append(self, row: Completion, tokens: list, logprobs: list) -> bool:
    return row.append(tokens, logprobs, self.tokenizer, self.eos_ids)
