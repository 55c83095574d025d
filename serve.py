"""Batch inference: JSONL requests in, JSONL results out, through the training forward.

  python serve.py --checkpoint=DIR --input=requests.jsonl --output=results.jsonl \\
      [--config.serve.batch_size=32] [--config.model.rope.scaling.type=...]

DIR is a run directory (its newest checkpoint), a checkpoint step or a converted
Hugging Face model. One request per line:

  {"id": 7, "prompt": "def fib(n):", "max_tokens": 64, "temperature": 0, "top_k": 0,
   "top_p": 1.0, "stop": ["\\n\\n"], "seed": 0, "logprobs": false}

(`prompt_tokens`: [ids] instead of `prompt`). One result per line, in input order:
`line`, `id`, `completion`, `tokens`, `finish_reason` (stop | length | error),
`prompt_tokens`, `logprobs` when asked, `error` when the line could not be served. A
bad line never stops the others. The last stderr line is a JSON report.

The engine (`Engine`, also used by the evaluation tools):
- Prefill is `Transformer.forward`, the training forward with its shardings: on a mesh
  with sequence > 1 a long prompt is attended with ring attention, its tokens in zigzag
  order spread over the ring, and the keys/values it computes stay where they are as
  the KV cache (model/kv_cache.py).
- Decode is the same forward with the cache, one token per row per step, inside a
  compiled `lax.while_loop` of up to `serve.decode_chunk` steps that stops when every
  row is done; sampling (temperature, top-k, top-p, per-request seeds) runs inside it.
- Requests are grouped by (prompt bucket, decode bucket), powers of two, into batches
  of up to `serve.batch_size` rows, so there is one prefill and one decode compilation
  per bucket pair and batch size. serve.py compiles them from the parameters' shapes
  while the checkpoint loads (`Engine.compile`), so compilation and loading overlap.
"""

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from configs import base, inherit
from configs.cli import fail, parse_flags
from model import checkpoint as ckpt_lib, kv_cache, transformer
from model.config import ConfigError
from parallel import layout, mesh as mesh_lib, sharding
from tools import evaluation

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags, defined only when serve.py runs as a program (the
  evaluation tools import the engine and define flags of their own)."""
  flags.DEFINE_string("checkpoint", None, "Run directory, checkpoint step or converted "
                      "Hugging Face model.")
  flags.DEFINE_string("input", None, "JSONL requests.")
  flags.DEFINE_string("output", None, "JSONL results (one line per request line).")
  flags.DEFINE_integer("cpu_devices", 8, "Virtual CPU devices (CPU backend only).")
  config_flags.DEFINE_config_dict("config", base.get_config(),
                                  "Overrides of the checkpoint's config.")

REQUEST_FIELDS = {"id", "prompt", "prompt_tokens", "max_tokens", "temperature", "top_k",
                  "top_p", "stop", "seed", "logprobs"}


class RequestError(ValueError):
  """A request line that cannot be served; the message says what is wrong."""


@dataclasses.dataclass
class Request:
  line: int                 # 1-based line number in the input file
  id: object                # the request's `id`, echoed back
  prompt_tokens: list       # token ids
  max_tokens: int
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0            # 0: no limit
  top_p: float = 1.0
  stop: tuple = ()
  seed: int = 0
  logprobs: bool = False


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_request(line: int, raw: bytes, *, tokenizer, vocab_size: int, max_context: int,
                  default_max_tokens: int, default_seed: int) -> Request:
  """A Request from one input line, or RequestError naming what is wrong."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise RequestError(f"the line is not UTF-8 (byte {error.start})") from None
  if not text.strip():
    raise RequestError("empty line")
  try:
    fields = json.loads(text)
  except json.JSONDecodeError as error:
    raise RequestError(f"invalid JSON: {error}") from None
  if not isinstance(fields, dict):
    raise RequestError("a request is a JSON object")
  request_id = fields.get("id")
  unknown = sorted(set(fields) - REQUEST_FIELDS)
  if unknown:
    raise RequestError(f"unknown field(s) {', '.join(unknown)}; known: "
                       f"{', '.join(sorted(REQUEST_FIELDS))}")
  if ("prompt" in fields) == ("prompt_tokens" in fields):
    raise RequestError("give exactly one of `prompt` (text) and `prompt_tokens` (ids)")
  if "prompt" in fields:
    prompt = fields["prompt"]
    if not isinstance(prompt, str):
      raise RequestError("`prompt` must be a string")
    if tokenizer is None:
      raise RequestError("this checkpoint has no tokenizer: send `prompt_tokens`")
    tokens = list(tokenizer.encode(prompt))
  else:
    tokens = fields["prompt_tokens"]
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
      raise RequestError("`prompt_tokens` must be a list of integers")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
      raise RequestError(f"`prompt_tokens` holds id {bad[0]} outside the vocabulary "
                         f"[0, {vocab_size})")
  if not tokens:
    raise RequestError("the prompt is empty")

  max_tokens = fields.get("max_tokens", default_max_tokens)
  if not _is_int(max_tokens) or max_tokens < 1:
    raise RequestError(f"`max_tokens` must be a positive integer, got {max_tokens!r}")
  if len(tokens) + max_tokens > max_context:
    raise RequestError(f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the "
                       f"model's context of {max_context} tokens (model.max_seq_len)")
  temperature = fields.get("temperature", 0.0)
  if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
    raise RequestError(f"`temperature` must be a finite number >= 0, got {temperature!r}")
  top_k = fields.get("top_k", 0)
  if not _is_int(top_k) or top_k < -1:
    raise RequestError(f"`top_k` must be an integer >= 0 (0 or -1: no limit), got {top_k!r}")
  top_p = fields.get("top_p", 1.0)
  if not _is_number(top_p) or not 0 < top_p <= 1:  # NaN fails both comparisons
    raise RequestError(f"`top_p` must be in (0, 1], got {top_p!r}")
  stop = fields.get("stop", [])
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    raise RequestError("`stop` must be a list of non-empty strings")
  if stop and tokenizer is None:
    raise RequestError("`stop` needs a tokenizer, and this checkpoint has none")
  seed = fields.get("seed", default_seed)
  if not _is_int(seed):
    raise RequestError(f"`seed` must be an integer, got {seed!r}")
  logprobs = fields.get("logprobs", False)
  if not isinstance(logprobs, bool):
    raise RequestError(f"`logprobs` must be true or false, got {logprobs!r}")
  return Request(line=line, id=request_id, prompt_tokens=tokens, max_tokens=max_tokens,
                 temperature=float(temperature), top_k=max(top_k, 0), top_p=float(top_p),
                 stop=tuple(stop), seed=seed % 2 ** 32, logprobs=logprobs)


def error_record(line: int, request_id, message: str) -> dict:
  return {"line": line, "id": request_id, "finish_reason": "error", "error": message}


# --- sampling (inside jit) -------------------------------------------------------------

def sample(logits, temperature, top_k, top_p, seeds, token_index, *, sampling: bool):
  """The next token of each row and its log-probability under the model.

  Args:
    logits: [B, V] float32.
    temperature, top_p: [B] float32; top_k: [B] int32 (0: no limit); seeds: [B] uint32.
    token_index: [B] int32, the index of the token being generated (with the seed it
      makes the row's random key, so a request samples the same tokens in any batch).
    sampling: False when every row is greedy (argmax only: nothing else is compiled).
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
    tokens = jnp.where(temperature > 0, sampled, tokens)
  return tokens, jnp.take_along_axis(logits, tokens[:, None], -1)[:, 0] - log_normalizer


# --- the engine ------------------------------------------------------------------------

def _bucket(n: int, minimum: int, multiple: int) -> int:
  """The smallest power of two >= max(n, minimum), rounded up to a multiple of `multiple`."""
  size = 1 << max(n - 1, minimum - 1, 0).bit_length()
  return -(-size // multiple) * multiple


@dataclasses.dataclass
class _Row:
  """A request being decoded (host side)."""
  request: Request
  tokens: list = dataclasses.field(default_factory=list)
  logprobs: list = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  completion: str | None = None


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
    self.graphdef, self.state = nnx.split(model)
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
    last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)  # [B, 1, dim]
    logits = model.head(last)[:, 0]
    cache = kv_cache.from_prefill(layer_kv, positions, valid, room, self.mesh)
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
      hidden, cache = model.forward(token[:, None], position[:, None], cache=cache)
      next_token, logprob = sample(model.head(hidden)[:, 0], *params, generated + i,
                                   sampling=sampling)
      out_tokens = out_tokens.at[:, i].set(next_token)
      out_logprobs = out_logprobs.at[:, i].set(logprob)
      done = done | jnp.isin(next_token, eos) | (generated + i + 1 >= max_tokens)
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
    the engine was built with)."""
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
          results[request.line] = error_record(request.line, request.id, message)
      if progress is not None:
        progress.update(len(batch))
    return results

  def _result(self, row: _Row) -> dict:
    request = row.request
    result = {"line": request.line, "id": request.id, "completion": row.completion,
              "tokens": row.tokens, "finish_reason": row.finish_reason,
              "prompt_tokens": len(request.prompt_tokens)}
    if request.logprobs:
      result["logprobs"] = row.logprobs
    return result

  def _put(self, array, logical_axes):
    return jax.device_put(np.ascontiguousarray(array),
                          sharding.named_sharding(self.mesh, logical_axes))

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
    prompt_arrays = [self._put(layout.to_zigzag(x, self.ring), ("batch", "sequence"))
                     for x in (tokens, positions, valid)]
    params = tuple(self._put(np.array([getattr(r, field) for r in padded], dtype), ("batch",))
                   for field, dtype in (("temperature", np.float32), ("top_k", np.int32),
                                        ("top_p", np.float32), ("seed", np.uint32)))
    sampling = any(r.temperature > 0 for r in batch)
    args = (self.state, *prompt_arrays, self._put(last_index, ("batch",)), params)
    return args, sampling, lengths

  def _prefill_executable(self, args, room: int, sampling: bool):
    return self._compile("prefill", self._prefill_fn, args,
                         (("room", room), ("sampling", sampling)))

  def _decode_executable(self, cache, token, position, done, generated, max_tokens, params,
                         sampling):
    """(decode executable, its arguments); the row arrays are [rows] numpy arrays."""
    args = (self.state, cache, *(self._put(x, ("batch",)) for x in
                                 (token, position, done, generated, max_tokens)), params)
    return self._compile("decode", self._decode_fn, args,
                         (("steps", self.decode_chunk), ("sampling", sampling)),
                         donate=(1,)), args

  def _generate_batch(self, batch: list, prompt_len: int, room: int) -> list:
    rows = [_Row(request) for request in batch]
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
    for row in rows:
      if self.tokenizer is not None and row.completion is None:
        row.completion = self._text(row)
    return rows

  def _text(self, row: _Row) -> str:
    """The completion's text: decoded with its prompt so that a first token's leading
    space survives (sentencepiece drops it when decoding a sequence on its own)."""
    prompt = row.request.prompt_tokens
    context = self.tokenizer.decode(prompt)
    text = self.tokenizer.decode(list(prompt) + list(row.tokens))
    return text[len(context):] if text.startswith(context) else self.tokenizer.decode(row.tokens)

  def _append(self, row: _Row, tokens: list, logprobs: list) -> bool:
    """Adds generated tokens to a row until it finishes; True when it has."""
    for token, logprob in zip(tokens, logprobs):
      if token in self.eos_ids:
        row.finish_reason = "stop"
        return True
      row.tokens.append(token)
      row.logprobs.append(logprob)
      if row.request.stop:
        text = self._text(row)
        found = [text.find(s) for s in row.request.stop if s in text]
        if found:
          row.completion, row.finish_reason = text[:min(found)], "stop"
          return True
      if len(row.tokens) >= row.request.max_tokens:
        row.finish_reason = "length"
        return True
    return False


# --- command line ----------------------------------------------------------------------

def _process_start() -> float:
  """time.perf_counter() at the moment this process started (Linux; else now)."""
  try:
    with open("/proc/self/stat") as f:
      started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return time.perf_counter() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return time.perf_counter()


def _request_id(raw: bytes):
  """The `id` of a line that failed to parse, when it has one."""
  try:
    fields = json.loads(raw)
  except (ValueError, UnicodeDecodeError):
    return None
  return fields.get("id") if isinstance(fields, dict) else None


def _mesh_sizes(config, named, longest: int) -> dict:
  """--config.mesh.* when given; else all devices on the ring (sequence) or on data."""
  if any(field.startswith("mesh.") for field in named):
    return config.mesh.to_dict()
  choice = config.serve.cache_sharding
  if choice not in ("auto", "sequence", "batch"):
    raise ValueError(f"serve.cache_sharding={choice!r}: use auto, sequence or batch")
  if choice == "auto":
    choice = "sequence" if longest >= config.serve.long_context else "batch"
  return {"sequence": -1} if choice == "sequence" else {"data": -1}


def _compilation_cache(config):
  directory = config.serve.compilation_cache or os.environ.get("RINGLM_COMPILATION_CACHE", "")
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def main(argv):
  del argv
  process_start, main_start = _process_start(), time.perf_counter()
  jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  logging.getLogger("absl").setLevel(logging.WARNING)
  config = FLAGS.config
  named = inherit.named_fields(sys.argv)
  _compilation_cache(config)
  try:
    with open(FLAGS.input, "rb") as f:
      lines = f.read().split(b"\n")
  except OSError as error:
    fail(f"--input: cannot read {FLAGS.input}: {error.strerror}")
  if lines and lines[-1] == b"":
    lines.pop()  # the file's final newline ends the last line; it is not a line
  try:
    step_dir, meta = ckpt_lib.load_meta(FLAGS.checkpoint)
  except FileNotFoundError as error:
    fail(f"--checkpoint: {error}")
  saved = meta["config"]

  # The context the model serves: model.max_seq_len from the command line, else the
  # checkpoint's (an extended model's is its new length).
  max_context = config.model.max_seq_len if "model.max_seq_len" in named \
      else saved["model"]["max_seq_len"]
  tokenizer = evaluation.load_tokenizer(step_dir, saved, required=False)
  results, requests = {}, []
  for number, raw in enumerate(lines, start=1):
    try:
      requests.append(parse_request(
          number, raw, tokenizer=tokenizer, vocab_size=saved["model"]["vocab_size"],
          max_context=max_context, default_max_tokens=config.serve.max_tokens,
          default_seed=config.seed))
    except RequestError as error:
      results[number] = error_record(number, _request_id(raw), str(error))

  longest = max((len(r.prompt_tokens) + r.max_tokens for r in requests), default=0)
  try:
    mesh = mesh_lib.make_mesh(_mesh_sizes(config, named, longest))
    shapes, _, _ = evaluation.load_model(step_dir, config, named, mesh, max_context,
                                         abstract=True)  # the parameters' shapes only
    mesh_lib.validate(shapes.config, mesh)
  except (ConfigError, ValueError) as error:
    fail(str(error))
  eos_ids = evaluation.end_of_sequence_ids(saved)
  if tokenizer is not None:
    eos_ids.append(tokenizer.eos_id())
  engine = Engine(shapes, mesh, tokenizer=tokenizer, eos_ids=eos_ids,
                  batch_size=config.serve.batch_size, min_bucket=config.serve.min_bucket,
                  decode_chunk=config.serve.decode_chunk)

  def timed_load():
    start = time.perf_counter()
    return transformer.load_parameters(shapes, step_dir)[0], time.perf_counter() - start

  # The executables need only the parameters' shapes: compile while the checkpoint loads.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    loading = pool.submit(timed_load)
    engine.compile(requests)
    model, load_s = loading.result()
  engine.use_parameters(model)

  with tqdm(total=len(requests), desc="serve", unit="req", disable=None, file=sys.stderr) as bar:
    results.update(engine.generate(requests, progress=bar))

  output = os.path.abspath(FLAGS.output)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  temporary = output + ".tmp"
  with open(temporary, "w") as f:
    for number in range(1, len(lines) + 1):
      f.write(json.dumps(results[number]) + "\n")
  os.replace(temporary, output)

  stats = engine.stats
  served = [results[r.line] for r in requests if results[r.line]["finish_reason"] != "error"]
  report = {
      "requests": len(lines),
      "errors": sum(r["finish_reason"] == "error" for r in results.values()),
      "prompt_tokens": sum(r["prompt_tokens"] for r in served),
      "generated_tokens": sum(len(r["tokens"]) for r in served),
      "prefill_tokens_per_s": stats["prefill_tokens"] / max(stats["prefill_s"], 1e-9),
      "decode_tokens_per_s": stats["decode_tokens"] / max(stats["decode_s"], 1e-9),
      "prefill_s": stats["prefill_s"], "decode_s": stats["decode_s"],
      "compile_s": stats["compile_s"], "compilations": engine.compilations, "load_s": load_s,
      "start_s": main_start - process_start,  # interpreter start-up and imports
      "wall_s": time.perf_counter() - process_start,
      "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "mesh": dict(mesh.shape),
  }
  print(json.dumps(report), file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint", "input", "output"])
  app.run(main, flags_parser=parse_flags)
