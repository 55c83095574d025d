"""Continuous batching on the device: a fixed set of decode slots over one SlotCache.

The programs (all compiled ahead, from shapes, by `compile_all`; their number is
`len(programs)`):

- `chunk` (one per chunk size L and live bucket >= L): prefills L tokens of one
  request's prompt into the staging row (a one-row SlotCache beside the cache), at its
  fill, attending over what it already holds (earlier chunks, a cached prefix) and
  over itself, within its first `live` slots; returns the first token (greedy or
  sampled, as the request asks) when the chunk is the prompt's last. One request
  prefills at a time; a chunk reads and writes the staging row only, never the whole
  cache (working on a row of the cache in place made XLA copy all of it, twice:
  ~80 ms a chunk at 8 x 4608 slots on the benchmark model, against ~17 ms here).
- `commit` (one per live bucket): the staging row copied into the request's row of the
  cache once its prompt is in, only the slots the prompt filled (and every position).
  A long prompt is prefilled chunk by chunk between decode calls, so the other slots'
  streams stall for at most one chunk.
- `decode` (a live bucket and a row bucket): up to `decode_steps` steps
  of every slot at once, each row at its own position and fill; rows that are not
  decoding (`done`) write into their last slot and are ignored. Attention reads only
  the first `live` slots (SlotCache.live) of the first `live_rows` rows: the
  smallest buckets (`live_buckets`: powers of two from MIN_LIVE, and the capacity;
  `row_buckets`: powers of two up to the slots) that hold every decoding row and its
  tokens, so a step costs what the cache holds, not what it could hold. Requests take
  the lowest free slots, so few requests use few rows. On XLA:CPU with one device there
  is one decode program instead: each row attends to its own live bucket, chosen per
  row at run time (SlotCache.row_slots), so a long request no longer makes every other
  row read as many slots (`ragged`).
- `put_prefix` / `take_prefix` (one per prefix length bucket): a cached prompt prefix
  put into the staging row, or its first slots kept (serving/prefix_cache.py).

On a mesh with sequence = N > 1 the cache's slots are spread over the ring (global slot
g on device g % N, ring.slot_write), attention merges the devices' partial results by
log-sum-exp (ring.cache_attention), and the dense layers of a chunk run on every
device of the ring. The mesh's batch axes split the slots.

Dimension letters: core/__init__.py (B = decode slots, L = a chunk's tokens,
C = slots of a row).
"""

import concurrent.futures
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import kv_cache, transformer
from parallel import ring, sharding
from serving.sampling import decode_step, sample

MIN_LIVE = 128  # smallest live bucket of the decode program
COMPILE_THREADS = 8  # compile_all's most threads
SAMPLING_FIELDS = (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32),
                   ("seed", np.uint32))


def chunk_sizes(smallest: int, largest: int, ring_size: int) -> tuple[int, ...]:
  """Powers of two from `smallest` to `largest`, each rounded up to a multiple of the
  ring (a chunk's slots are spread evenly over it)."""
  sizes, size = [], 1 << max(smallest - 1, 0).bit_length()
  while True:
    sizes.append(-(-size // ring_size) * ring_size)
    if size >= largest:
      break
    size *= 2
  return tuple(sorted(set(sizes)))


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """Slots per row of the SlotCache, and whether the row rolls (SlotEngine.row_layout)."""
  capacity: int
  rolling: bool
  kept: int


class SlotEngine:
  """The programs of continuous batching on `mesh` for `model` (a Transformer whose
  parameters live on the mesh; abstract parameters are enough to compile).

  Args:
    slots: decode slots B (rows of the cache). The mesh's batch axes must be 1 (the
      staging row is not split; the slots' caches are spread over the ring).
    capacity: slots C of a row: the longest request (prompt + max_tokens) plus one
      chunk, rounded up to a multiple of the ring (capacity_for).
    chunk_sizes: the prompt chunk lengths L compiled (chunk_sizes()).
    decode_steps: decode steps per call.
    min_live: the smallest live bucket of the decode program (live_buckets).
  """

  def __init__(self, model, mesh, *, slots: int, capacity: int, chunks: tuple,
               decode_steps: int, eos_ids=(), min_live: int = MIN_LIVE, rolling=False,
               kept=0):
    self.model, self.mesh = model, mesh
    self.rolling, self.kept = rolling, kept
    config = model.config
    if rolling and (not config.windowed_everywhere
                    or capacity - kept < config.window - 1 + max(chunks)):
      raise ValueError(f"a rolling cache of {capacity} slots (keeping {kept}) needs a model "
                       f"windowed on every layer and at least model.window - 1 + the largest "
                       f"chunk = {config.window - 1 + max(chunks)} slots beyond the kept ones "
                       "(SlotEngine.row_layout)")
    self.graphdef, state = nnx.split(model)
    # as serving holds it (the caller's model unchanged)
    self.state = transformer.serving_layout(state, ring.platform_of(mesh))
    self.slots, self.capacity, self.chunks = slots, capacity, tuple(chunks)
    self.decode_steps, self.min_live = decode_steps, min_live
    self.eos_ids = tuple(sorted({int(e) for e in eos_ids if e is not None and e >= 0}))
    self.ring = mesh.shape["sequence"]
    # XLA:CPU, one device: one decode program whose rows attend each to its own live
    # bucket (SlotCache.row_slots), not every row to the longest's.
    self.ragged = ring.platform_of(mesh) == "cpu" and self.ring == 1 and not rolling
    if mesh.shape["data"] * mesh.shape["fsdp"] != 1:
      raise ValueError(f"continuous batching keeps its rows whole on the ring: mesh "
                       f"{dict(mesh.shape)} needs data = fsdp = 1")
    self.programs = {}
    self._lowered = None  # inside compile_all: (name, static, shape) -> lowered program
    self.compile_s = 0.0
    self.lower_s = 0.0  # of compile_all: tracing and lowering, before the compiles
    self.cache = self.staging = None
    self._abstract_caches = {}  # rows -> the SlotCache's shapes (_shapes)

  @staticmethod
  def capacity_for(max_context: int, largest_chunk: int, ring_size: int) -> int:
    return -(-(max_context + largest_chunk) // ring_size) * ring_size

  @staticmethod
  def row_layout(config, max_context: int, largest_chunk: int, ring_size: int) -> "RowLayout":
    """The slots of a row: every token of the longest request (capacity_for), or, for a
    model whose every layer has a sliding window W and S sink tokens, a rolling row
    (model/kv_cache.SlotCache) where that is smaller: S kept slots and W - 1 + the
    largest chunk reused ones (a chunk's first query still sees the W - 1 tokens
    before it while the chunk overwrites the oldest), each rounded up to the ring. A
    rolling row serves any context length."""
    whole = SlotEngine.capacity_for(max_context, largest_chunk, ring_size)
    if not config.windowed_everywhere:
      return RowLayout(whole, False, 0)
    up = lambda n: -(-n // ring_size) * ring_size
    kept = up(config.sink_tokens)
    rolling = kept + up(config.window - 1 + largest_chunk)
    return RowLayout(rolling, True, kept) if rolling < whole else RowLayout(whole, False, 0)

  def cache_bytes(self) -> int:
    """Bytes of the SlotCache and the staging row (keys and values of every layer, and
    positions)."""
    return (self.slots + 1) * self.capacity * kv_cache.per_token_bytes(self.model.config)

  def use_parameters(self, model) -> None:
    """As Engine.use_parameters: `model` held as transformer.serving_layout says, in
    place."""
    transformer.hold_serving_layout(model)
    self.model, self.state = model, nnx.split(model)[1]

  def reset(self) -> None:
    """An empty cache and staging row (made on the mesh)."""
    self.cache = self._empty(self.slots)
    self.staging = self._empty(1)

  def _empty(self, rows: int) -> kv_cache.SlotCache:
    return kv_cache.empty_slots(self.model.config, self.mesh, rows, self.capacity,
                                rolling=self.rolling, kept=self.kept)

  # --- the programs --------------------------------------------------------------------

  def _chunk_fn(self, state, staging, start, tokens, positions, last, params, *, live):
    """The staging row's next L prompt tokens (tokens, positions [1, L]; positions EMPTY
    at padding) written from slot `start` (start + L <= live); the token sampled after
    index `last`."""
    model = nnx.merge(self.graphdef, state)
    staging = dataclasses.replace(staging, fill=jnp.reshape(start, (1,)).astype(jnp.int32))
    staging = staging.clear_from(self.mesh)  # nothing of an earlier request past `start`
    hidden, staging = model.forward(tokens, positions,
                                    cache=dataclasses.replace(staging, live=live))
    logits = model.head(jax.lax.dynamic_slice_in_dim(hidden, last, 1, axis=1))[:, 0]
    token, logprob = sample(logits, *params, jnp.zeros((1,), jnp.int32), sampling=True)
    return token[0], logprob[0], dataclasses.replace(staging, live=0)

  def _commit_fn(self, cache, staging, row, *, live):
    """The staging row written over row `row` of the cache: its positions whole, its
    keys and values (and scales) in the first `live` global slots only, the ones a
    prompt of at most `live` tokens filled (the row's older values beyond stay, unseen:
    their positions are EMPTY). The whole row was 8-9 ms of copying per request at 4.6K
    slots on the benchmark model, 14.5 ms at 16K."""
    used = live // self.ring  # local slots [0, used) of every device: the first `live`
    arrays = [(full, part, slot_axis) for (_, _, full, slot_axis), (_, _, part, _) in
              zip(kv_cache.slot_arrays(cache), kv_cache.slot_arrays(staging))]
    specs = [ring.cache_spec("sequence", full.ndim, slot_axis) for full, _, slot_axis in arrays]

    def local(fulls, parts, row):
      written = []
      for full, part, (_, _, slot_axis) in zip(fulls, parts, arrays):
        if slot_axis != ring.POSITION_SLOTS:
          part = jax.lax.slice_in_dim(part, 0, used, axis=slot_axis)
        written.append(jax.lax.dynamic_update_slice(full, part,
                                                    (row,) + (0,) * (full.ndim - 1)))
      return written

    written = jax.shard_map(local, mesh=self.mesh, in_specs=(specs, specs, jax.P()),
                            out_specs=specs, check_vma=False)(
        [full for full, _, _ in arrays], [part for _, part, _ in arrays], row)
    return kv_cache.with_slot_arrays(cache, written)

  def _decode_fn(self, state, cache, token, position, fill, done, generated, max_tokens,
                 params, limit, *, steps, live, live_rows):
    """Up to `limit` (a scalar, at most `steps`) steps of every row not `done` ([B]
    arrays); stops early when every row is done. Attends to the first `live` slots of
    the first `live_rows` rows (every decoding row must be among them, its fill + steps
    within them). Returns (steps run, cache, tokens [B, steps], logprobs [B, steps])."""
    model = nnx.merge(self.graphdef, state)
    cache = dataclasses.replace(cache, live=live, live_rows=live_rows)
    if self.ragged:
      cache = dataclasses.replace(cache, row_slots=jnp.zeros_like(fill),
                                  row_buckets=tuple(self.live_buckets()))
    eos = jnp.asarray(self.eos_ids or (-1,), jnp.int32)
    rows, last_slot = token.shape[0], self.capacity - 1

    def cond(carry):
      i, _, _, _, _, done, _, _ = carry
      return (i < jnp.minimum(limit, steps)) & ~jnp.all(done)

    def body(carry):
      i, cache, token, position, fill, done, out_tokens, out_logprobs = carry
      # A row that is not decoding writes into its last slot (cleared before reuse).
      cache = dataclasses.replace(cache, fill=jnp.where(done, last_slot, fill))
      if self.ragged:  # the slots of each decoding row, with this step's
        cache = dataclasses.replace(cache, row_slots=jnp.where(done, 0, fill + 1))
      next_token, logprob, cache, done = decode_step(
          model, cache, token, position, params, generated + i, eos, max_tokens, done,
          sampling=True)
      out_tokens = out_tokens.at[:, i].set(next_token)
      out_logprobs = out_logprobs.at[:, i].set(logprob)
      return (i + 1, cache, next_token, position + 1, fill + 1, done, out_tokens,
              out_logprobs)

    carry = (jnp.zeros((), jnp.int32), cache, token, position, fill, done,
             jnp.zeros((rows, steps), jnp.int32), jnp.zeros((rows, steps), jnp.float32))
    steps_done, cache, *_, out_tokens, out_logprobs = jax.lax.while_loop(cond, body, carry)
    cache = dataclasses.replace(cache, live=0, live_rows=0, row_slots=None, row_buckets=())
    return steps_done, cache, out_tokens, out_logprobs

  def _compile(self, name, function, args, static, donate=(), shape=None):
    """The program `name` of `static` options (and `shape`), compiled on first use; inside
    compile_all only lowered (its `out_info` is what another program's shapes may need)
    and compiled there with the rest."""
    key = (name, static, shape)
    if key in self.programs:
      return self.programs[key]
    if self._lowered is not None and key in self._lowered:
      return self._lowered[key]
    start = time.perf_counter()
    program = jax.jit(functools.partial(function, **dict(static)),
                      donate_argnums=donate).lower(*args)
    if self._lowered is not None:
      self._lowered[key] = program
    else:
      program = self.programs[key] = program.compile()
    self.compile_s += time.perf_counter() - start
    return program

  def _shapes(self, cache_rows: int | None = None):
    """Abstract arguments: (a SlotCache of `cache_rows` rows (default: the slots), a [B]
    row array of a dtype, a scalar of a dtype). The cache's shapes are made once per
    row count: every decode call, chunk and commit looks its program up through them,
    and tracing them took 2.4 ms a call on the benchmark model."""
    named = lambda axes: sharding.named_sharding(self.mesh, axes)
    cache_rows = self.slots if cache_rows is None else cache_rows
    rows = lambda dtype: jax.ShapeDtypeStruct((self.slots,), dtype, sharding=named(("batch",)))
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=named(()))
    if cache_rows in self._abstract_caches:
      return self._abstract_caches[cache_rows], rows, scalar
    cache = jax.eval_shape(lambda: self._empty(cache_rows))
    # eval_shape drops shardings; give the cache its own.
    spec = lambda ndim, slot_axis: jax.sharding.NamedSharding(
        self.mesh, ring.cache_spec("sequence", ndim, slot_axis))
    cache = kv_cache.with_slot_arrays(cache, [
        jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=spec(array.ndim, slot_axis))
        for _, _, array, slot_axis in kv_cache.slot_arrays(cache)])
    cache = dataclasses.replace(cache, fill=jax.ShapeDtypeStruct(
        (cache_rows,), jnp.int32, sharding=named(("batch",))))
    self._abstract_caches[cache_rows] = cache
    return cache, rows, scalar

  def chunk_program(self, length: int, live: int):
    staging, _, scalar = self._shapes(cache_rows=1)
    replicated = sharding.named_sharding(self.mesh, ())
    prompt = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=replicated)
    params = tuple(jax.ShapeDtypeStruct((1,), dtype, sharding=replicated)
                   for _, dtype in SAMPLING_FIELDS)
    args = (self.state, staging, scalar(jnp.int32), prompt, prompt, scalar(jnp.int32), params)
    return self._compile("chunk", self._chunk_fn, args, (("live", live),), donate=(1,),
                         shape=length)

  def live_buckets(self) -> list[int]:
    """The programs' live sizes: powers of two from min_live (multiples of the
    ring) below the capacity, then the capacity."""
    sizes, size = [], self.min_live
    while size < self.capacity:
      sizes.append(-(-size // self.ring) * self.ring)
      size *= 2
    return sorted(set(s for s in sizes if s < self.capacity)) + [self.capacity]

  def live_bucket(self, slots: int) -> int:
    """The smallest live size holding `slots` slots of every row (all of them when a
    rolling row has wrapped)."""
    return next(size for size in self.live_buckets() if size >= min(slots, self.capacity))

  def row_buckets(self) -> list[int]:
    """The decode program's row counts: powers of two below the slots, then the slots."""
    return [1 << i for i in range(max(self.slots - 1, 0).bit_length())
            if 1 << i < self.slots] + [self.slots]

  def decode_program(self, live: int, live_rows: int):
    """The decode program of a live bucket and a row bucket (ragged: only the whole
    cache's, `decode_buckets`). It samples only when some row asks to
    (serving/sampling.sample), so greedy and sampled batches share it."""
    cache, rows, scalar = self._shapes()
    args = (self.state, cache, rows(jnp.int32), rows(jnp.int32), rows(jnp.int32),
            rows(jnp.bool_), rows(jnp.int32), rows(jnp.int32),
            tuple(rows(dtype) for _, dtype in SAMPLING_FIELDS), scalar(jnp.int32))
    return self._compile("decode", self._decode_fn, args,
                         (("steps", self.decode_steps), ("live", live),
                          ("live_rows", live_rows)), donate=(1,))

  def commit_program(self, live: int):
    cache, _, scalar = self._shapes()
    return self._compile("commit", self._commit_fn,
                         (cache, self._shapes(cache_rows=1)[0], scalar(jnp.int32)),
                         (("live", live),), donate=(0,))

  # Prefixes (serving/prefix_cache.py): the staging row's first slots out, or into it.
  def prefix_bucket(self, tokens: int) -> int:
    """Slots kept for a prefix of `tokens`: a power of two (a multiple of the ring),
    at most the row's capacity."""
    size = -(-(1 << max(tokens - 1, 0).bit_length()) // self.ring) * self.ring
    return min(size, self.capacity)

  def _prefix_specs(self):
    return [(ring.cache_spec("sequence", array.ndim, axis), axis)
            for _, _, array, axis in kv_cache.slot_arrays(self.cache_shapes)]

  @property
  def cache_shapes(self):
    return self._shapes()[0]

  def _take_fn(self, staging, *, length):
    arrays = [array for _, _, array, _ in kv_cache.slot_arrays(staging)]
    local = length // self.ring
    out = []
    for array, (spec, axis) in zip(arrays, self._prefix_specs()):
      take = lambda a, axis=axis: jax.lax.slice_in_dim(a, 0, local, axis=axis)
      out.append(jax.shard_map(take, mesh=self.mesh, in_specs=spec, out_specs=spec,
                               check_vma=False)(array))
    return out

  def _put_fn(self, staging, kept):
    arrays = [array for _, _, array, _ in kv_cache.slot_arrays(staging)]
    out = []
    for array, part, (spec, _) in zip(arrays, kept, self._prefix_specs()):
      put = lambda a, p: jax.lax.dynamic_update_slice(a, p, [0] * a.ndim)
      out.append(jax.shard_map(put, mesh=self.mesh, in_specs=(spec, spec), out_specs=spec,
                               check_vma=False)(array, part))
    return kv_cache.with_slot_arrays(staging, out)

  def _prefix_programs(self, length: int):
    staging = self._shapes(cache_rows=1)[0]
    take = self._compile("take_prefix", self._take_fn, (staging,), (("length", length),))
    put = self._compile("put_prefix", self._put_fn, (staging, take.out_info), (),
                        donate=(0,), shape=length)
    return take, put

  def take_prefix(self, length: int):
    """The staging row's first `length` slots (a prefix_bucket), as device arrays."""
    return self._prefix_programs(length)[0](self.staging)

  def put_prefix(self, kept) -> None:
    """Writes slots kept by take_prefix into the staging row's first slots. The caller
    then prefills from the prefix's end (the chunk clears every later slot)."""
    self.staging = self._prefix_programs(kept[-1].shape[1])[1](self.staging, kept)

  @property
  def per_token_bytes(self) -> int:
    return kv_cache.per_token_bytes(self.model.config)

  def compile_all(self, prefix_block: int = 0) -> int:
    """Compiles every program serving can run (with `prefix_block`, the prefix cache's
    too); returns how many there are. They are traced and lowered one after another,
    then compiled on one thread a CPU core (at most COMPILE_THREADS; XLA compiles
    outside the GIL): 82 programs took 160 s one at a time on 2 cores, 146 s so."""
    self._lowered = {}
    try:
      start = time.perf_counter()
      self._lower_all(prefix_block)
      self.lower_s = time.perf_counter() - start
      pending = self._lowered
    finally:
      self._lowered = None
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(min(os.cpu_count() or 1,
                                                   COMPILE_THREADS)) as pool:
      self.programs.update(zip(pending, pool.map(lambda lowered: lowered.compile(),
                                                 pending.values())))
    self.compile_s += time.perf_counter() - start
    return len(self.programs)

  def decode_buckets(self) -> list[tuple[int, int]]:
    """(live, live_rows) of every decode program: each live bucket with each row bucket,
    or ragged, only (capacity, slots)."""
    if self.ragged:
      return [(self.capacity, self.slots)]
    return [(live, rows) for live in self.live_buckets() for rows in self.row_buckets()]

  def _lower_all(self, prefix_block: int) -> None:
    for live, live_rows in self.decode_buckets():
      self.decode_program(live, live_rows)
    for live in self.live_buckets():
      self.commit_program(live)
      for length in self.chunks:
        if length <= live:
          self.chunk_program(length, live)
    if prefix_block:
      lengths = {self.prefix_bucket(n) for n in range(prefix_block, self.capacity + 1,
                                                         prefix_block)}
      for length in sorted(lengths):
        self._prefix_programs(length)

  # --- running them (host arrays in, host arrays out) ------------------------------------

  def _rows(self, array):
    return sharding.put_rows(np.asarray(array), self.mesh, ("batch",))

  def prefill_chunk(self, start: int, tokens, positions, last: int, request):
    """Runs one chunk (tokens, positions: [L] numpy, L in self.chunks) of `request`'s
    prompt into the staging row from slot `start`; returns (token, logprob) sampled
    after index `last` of the chunk (meaningful for a prompt's last chunk)."""
    length = len(tokens)
    program = self.chunk_program(length, self.live_bucket(start + length))
    replicated = sharding.named_sharding(self.mesh, ())
    put = lambda x: jax.device_put(x, replicated)
    params = tuple(put(np.asarray([getattr(request, field)], dtype))
                   for field, dtype in SAMPLING_FIELDS)
    token, logprob, self.staging = program(
        self.state, self.staging, put(np.int32(start)), put(np.asarray(tokens, np.int32)[None]),
        put(np.asarray(positions, np.int32)[None]), put(np.int32(last)), params)
    return int(token), float(logprob)

  def commit(self, row: int, filled: int) -> None:
    """The staging row (a prompt just prefilled, `filled` tokens) into row `row` of the
    cache: the slots of its live bucket."""
    replicated = sharding.named_sharding(self.mesh, ())
    program = self.commit_program(self.live_bucket(filled))
    self.cache = program(self.cache, self.staging, jax.device_put(np.int32(row), replicated))

  def decode(self, token, position, fill, done, generated, max_tokens, params,
             steps: int | None = None):
    """One decode call over every slot ([B] numpy arrays; params: the SAMPLING_FIELDS
    arrays) of `steps` steps (default and most: decode_steps; the step count is an
    argument of the program, not a new program). Returns (steps run, tokens [B, steps],
    logprobs [B, steps]) as numpy."""
    steps = self.decode_steps if steps is None else min(steps, self.decode_steps)
    needed = int(np.max(np.where(done, 0, fill))) + steps
    last_row = int(np.flatnonzero(~np.asarray(done))[-1])
    program = self.decode_program(*next(
        (live, rows) for live, rows in self.decode_buckets()
        if live >= min(needed, self.capacity) and rows > last_row))
    args = [self._rows(x) for x in (token, position, fill, done, generated, max_tokens)]
    replicated = sharding.named_sharding(self.mesh, ())
    steps, self.cache, tokens, logprobs = program(
        self.state, self.cache, *args, tuple(self._rows(p) for p in params),
        jax.device_put(np.int32(steps), replicated))
    steps = int(steps)
    return steps, np.asarray(tokens)[:, :steps], np.asarray(logprobs)[:, :steps]


def kv_capacity(*, per_token_bytes: int, free_bytes: int, slots: int, max_context: int,
                largest_chunk: int, ring_size: int, rolling_slots: int = 0) -> dict:
  """What fits in `free_bytes` of KV cache (after the parameters and the prefix cache):
  {"max_context": longest request (prompt + max_tokens) per slot at `slots` slots,
   "max_batch": most slots at `max_context`, "fits": both asked for fit,
   "cache_bytes": the cache asked for}. A row holds its request plus one chunk
  (SlotEngine.capacity_for), or with `rolling_slots` at most that many slots (a rolling
  row, SlotEngine.row_layout, which holds a request of any length); there is one row
  more than the slots, the staging row."""
  row = lambda context: SlotEngine.capacity_for(context, largest_chunk, ring_size)
  if rolling_slots:
    row = lambda context: min(SlotEngine.capacity_for(context, largest_chunk, ring_size),
                              rolling_slots)
  per_row = row(max_context) * per_token_bytes
  rows = slots + 1
  room = (free_bytes // rows) // per_token_bytes
  if rolling_slots and room >= rolling_slots:
    longest = max_context  # a rolling row: any length
  else:
    longest = max((room - largest_chunk) // ring_size * ring_size, 0)
  return {"max_context": min(longest, max_context), "fits": rows * per_row <= free_bytes,
          "max_batch": max(int(free_bytes // per_row) - 1, 0), "cache_bytes": rows * per_row,
          "free_bytes": free_bytes}
