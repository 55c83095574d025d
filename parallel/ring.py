"""Ring attention over the `sequence` mesh axis (docs/design.md, "The ring, step by step").

Dimension letters: core/__init__.py.

Each of the N devices on the ring keeps its queries and passes its key/value block
(with the keys' positions and segment ids) to the next device N-1 times, attending
to every block it holds and merging the partial results by log-sum-exp:

  forward   for s in 0..N-1: send the held KV block on (ppermute), attend to it,
            lse' = logaddexp(lse, lse_s); o = o·exp(lse-lse') + o_s·exp(lse_s-lse')
  backward  for s in 0..N-1: dq += dq_s; the dK/dV accumulators travel with their KV
            block and collect dk_s, dv_s at every stop; one last hop takes them home.

The per-block work is `block_attention` / `block_attention_bwd` of a kernel module in
`parallel/kernels/`. Masks come from positions and segment ids, so any token order is
exact; the zigzag order (parallel/layout.py) balances causal work across the ring.
Only the KV heads travel (GQA is never expanded before the ppermute).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from parallel import quantized, sharding
from parallel.kernels import cpu_decode, masking, xla

IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")


def platform_of(mesh) -> str:
  """The platform the program is compiled for: its mesh's devices' ("cpu", "tpu", "gpu"),
  which need not be the process's default backend (a TPU topology's compile-only devices
  on a CPU host, docs/tpu.md)."""
  return mesh.devices.flat[0].platform


def kernel_module(impl: str, platform: str):
  """The kernel module for `impl` on `platform` (`platform_of(mesh)`): "auto" picks the
  platform's Pallas kernel (TPU Mosaic, GPU Triton) and XLA on CPU."""
  if impl == "auto":
    impl = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(platform, "xla")
  if impl == "xla":
    return xla
  if impl == "pallas_tpu":
    from parallel.kernels import pallas_tpu
    return pallas_tpu
  if impl == "pallas_gpu":
    from parallel.kernels import pallas_gpu
    return pallas_gpu
  raise ValueError(f"attention.impl={impl!r} is not available; use one of {IMPLS}")


def kernel_options(kernel, platform: str) -> dict:
  """Options every call of `kernel` on `platform` takes: a Pallas kernel runs compiled on
  its own platform and in interpret mode elsewhere (CPU: slow, for tests)."""
  return {} if kernel is xla else {"interpret": platform == "cpu"}


def _fit(size, length):
  """The largest of size, size/2, size/4, ... (down to 8) that divides `length`."""
  while size > 8 and length % size:
    size //= 2
  return size


def _merge(out, lse, block_out, block_lse):
  """Log-sum-exp merge of two partial attentions over disjoint keys (rows with no key stay 0)."""
  new_lse = jnp.logaddexp(lse, block_lse)
  safe = jnp.where(new_lse == -jnp.inf, 0.0, new_lse)[..., None]
  out = out * jnp.exp(lse[..., None] - safe) + block_out * jnp.exp(block_lse[..., None] - safe)
  return out, new_lse


def _to_next(ring_size):
  """ppermute pairs: device i sends to device i + 1 (mod N)."""
  return [(i, (i + 1) % ring_size) for i in range(ring_size)]


def _around_the_ring(kv_block, state, visit, *, axis, ring_size, steps=None):
  """state = visit(kv_block, state) for each of the N KV blocks as they pass this device
  (or the first `steps`, a traced int32 the same on every device: a shortened ring).

  The block moves on to the next device (ppermute) before each visit but the last, so
  the transfer overlaps the compute; returns the final state.
  """
  def step(_, carry):
    kv_block, state = carry
    next_block = lax.ppermute(kv_block, axis, _to_next(ring_size))  # issued before the compute
    return next_block, visit(kv_block, state)

  steps = ring_size if steps is None else steps
  kv_block, state = lax.fori_loop(0, steps - 1, step, (kv_block, state))
  return visit(kv_block, state)  # the last block: nothing left to send


def _steps_needed(positions, segment_ids, *, axis, ring_size, causal, window, sinks):
  """How far the KV blocks must travel (docs/design.md, "Sliding windows on the ring"):
  the number of ring steps s = 1..N after which no device's queries can see the block
  that arrives next, an int32 scalar that is the same on every device of the mesh (the
  largest over the data shards), or None for all N (no window, or sinks: the first
  tokens are seen by every later query).

  Every device shares the ranges of its positions and segment ids (4 int32 each, an
  all-gather), and step s is needed when some device i may see the block of device
  i - s (masking.range_states). With a window W in natural order, N local tokens each,
  that is 1 + ceil((W - 1) / L_local) steps; in zigzag order a device's second chunk
  needs its neighbour's, which comes last, so the ring does not shorten.
  """
  if not window or sinks:
    return None
  summary = jnp.stack([positions.min(), positions.max(), segment_ids.min(), segment_ids.max()])
  everyone = lax.all_gather(summary, axis)                      # [N, 4]
  device, step = jnp.arange(ring_size)[:, None], jnp.arange(ring_size)[None, :]
  queries = [everyone[:, None, c] for c in range(4)]            # [N, 1]
  keys = [everyone[(device - step) % ring_size, c] for c in range(4)]  # [N devices, N steps]
  visible, _ = masking.range_states(queries, keys, causal, window, sinks)
  needed = visible.any(axis=0)                                  # [N steps]
  steps = jnp.max(jnp.where(needed, jnp.arange(1, ring_size + 1), 1)).astype(jnp.int32)
  # One count on every device of the mesh, not just of this ring: the loops (and their
  # transfers) then run alike in every data shard.
  return lax.pmax(steps, sharding.RULES["batch"])


def _local_ring(q, k, v, positions, segment_ids, *, kernel, kernel_opts, axis, ring_size,
                causal, scale, block_q, block_kv, window, sinks):
  """The per-device ring (runs inside shard_map); differentiable through its custom VJP."""
  def ring(kv_block, state, visit):
    """_around_the_ring, as far as the blocks need to travel; returns (state, steps)."""
    _, _, positions, segment_ids = kv_block
    steps = _steps_needed(positions, segment_ids, axis=axis, ring_size=ring_size,
                          causal=causal, window=window, sinks=sinks)
    return _around_the_ring(kv_block, state, visit, axis=axis, ring_size=ring_size,
                            steps=steps), steps

  # Unset block sizes: the kernel's default, halved until it divides the local half, so
  # no block straddles the two chunks a device holds in zigzag order (a straddling
  # block could rarely be skipped).
  half = q.shape[1] // 2 if ring_size > 1 else q.shape[1]
  opts = dict(kernel_opts, causal=causal, scale=scale, window=window, sinks=sinks,
              block_q=block_q or _fit(kernel.BLOCK_Q, half),
              block_kv=block_kv or _fit(kernel.BLOCK_KV, half))

  def forward(q, k, v, positions, segment_ids):
    def attend(kv_block, state):
      k, v, kv_pos, kv_seg = kv_block
      block_out, block_lse = kernel.block_attention(q, k, v, positions, kv_pos, segment_ids,
                                                    kv_seg, **opts)
      return _merge(*state, block_out.astype(jnp.float32), block_lse)

    state = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -jnp.inf, jnp.float32))
    (out, lse), _ = ring((k, v, positions, segment_ids), state, attend)
    return out.astype(q.dtype), lse

  @jax.custom_vjp
  def attention(q, k, v, positions, segment_ids):
    return forward(q, k, v, positions, segment_ids)[0]

  def attention_fwd(q, k, v, positions, segment_ids):
    out, lse = forward(q, k, v, positions, segment_ids)
    return out, (q, k, v, positions, segment_ids, out, lse)

  def attention_bwd(residuals, dout):
    q, k, v, positions, segment_ids, out, lse = residuals

    def grads(kv_block, state):
      dq, dkv = state
      k, v, kv_pos, kv_seg = kv_block
      dq_s, dk_s, dv_s = kernel.block_attention_bwd(q, k, v, positions, kv_pos, segment_ids,
                                                    kv_seg, out, lse, dout, **opts)
      # The accumulators follow their block (after the last block: the hop home), dK and
      # dV as one array [2, B, S, K, D]: one transfer, issued before the dQ kernel.
      dkv = lax.ppermute(dkv + jnp.stack([dk_s, dv_s]), axis, _to_next(ring_size))
      return dq + dq_s, dkv

    zeros = jnp.zeros(q.shape, jnp.float32), jnp.zeros((2, *k.shape), jnp.float32)
    (dq, dkv), steps = ring((k, v, positions, segment_ids), zeros, grads)
    if steps is not None:  # a shortened ring: the accumulators are `steps` hops from home
      back = [(i, (i - 1) % ring_size) for i in range(ring_size)]
      dkv = lax.fori_loop(0, steps, lambda _, x: lax.ppermute(x, axis, back), dkv)
    dk, dv = dkv
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

  attention.defvjp(attention_fwd, attention_bwd)
  return attention(q, k, v, positions, segment_ids)


def ring_attention(q, k, v, *, positions, segment_ids=None, causal=True, mesh, axis="sequence",
                   impl="auto", scale=None, block_q=None, block_kv=None, window=0, sinks=0):
  """Softmax attention of q over k, v with the sequence split over the `axis` ring.

  Args (global arrays):
    q: [B, L, H, D], batch over (data, fsdp), L over `axis`, heads over tensor.
    k, v: [B, L, K, D] with H % K == 0, sharded like q (kv heads over tensor).
    positions: [B, L] int32 token positions (any order: natural or zigzag).
    segment_ids: [B, L] int32 document ids of packed rows, or None (one document).
    causal: a query sees keys with kv_pos <= q_pos (and the same segment id).
    window: a sliding window (0: none): a query at p sees keys at positions in (p - window,
      p]; blocks outside every window are skipped, and the ring stops once no device
      sees what would come next (_steps_needed). sinks: with a window, keys at positions
      < sinks stay visible (parallel/kernels/masking.py).
    mesh: the Mesh; `axis` is its ring axis. scale defaults to D**-0.5.
    impl: kernel implementation (one of IMPLS; "auto": the mesh's platform's, see
      kernel_module); block_q/block_kv: kernel block sizes (None: the kernel's default).
  Returns:
    [B, L, H, D] in q.dtype, sharded like q. Rows that see no key are 0.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  masking.check_window(causal, window, sinks)
  if segment_ids is None:
    segment_ids = jnp.zeros(positions.shape, jnp.int32)
  batch_axes = sharding.RULES["batch"]
  q_spec = jax.P(batch_axes, axis, sharding.RULES["heads"], None)
  kv_spec = jax.P(batch_axes, axis, sharding.RULES["kv_heads"], None)
  token_spec = jax.P(batch_axes, axis)
  platform = platform_of(mesh)
  kernel = kernel_module(impl, platform)
  local = functools.partial(
      _local_ring, kernel=kernel, kernel_opts=kernel_options(kernel, platform), axis=axis,
      ring_size=mesh.shape[axis], causal=causal, scale=scale, block_q=block_q,
      block_kv=block_kv, window=window, sinks=sinks)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, token_spec,
                                                   token_spec), out_specs=q_spec,
                       # The kernels' lax.cond branches and Pallas calls carry no
                       # varying-axis types; every output is varying over all axes anyway.
                       check_vma=False)(
      q, k, v, positions.astype(jnp.int32), segment_ids.astype(jnp.int32))


# --- Decode over a KV cache (serve.py) ------------------------------------------------
#
# (docs/design.md, "Decode over a sequence-sharded cache".)
# The cache of one layer is keys [B, K, D, C] and values [B, K, C, D]: batch over
# (data, fsdp), kv heads over tensor, the C slots over the `sequence` axis, as the
# forward's keys are split. Keys keep the slots minor, so that q.k runs along
# contiguous slots (on CPU 0.42 against 1.14 ms per layer slots-major, for 32 rows x 4
# kv heads x 256 slots x 64);
# values keep them major, so that p.v runs along contiguous head dimensions. Each
# device's local slots are [its chunk of the prefilled prompt | its share of the
# decode slots], and every slot carries the position of the token in it ([B, C], EMPTY
# for padding and unused slots), so attention masks by position and the slot order
# never matters. Decode step t writes its token into device t % N, local decode slot
# t // N: the device that owns the slot writes, the others keep theirs.

EMPTY = 2 ** 30  # position of a padding or unused cache slot: later than every query
KEY_SLOTS, VALUE_SLOTS, POSITION_SLOTS = 3, 2, 1  # the slot axis of each cache array
SCALE_SLOTS = 2  # a quantized cache's key and value scales [B, K, C]

# A continuous-batching bfloat16 cache on CPU is held as its bits, in uint16
# (model/kv_cache.held_dtype): XLA:CPU widens a bfloat16 array to float32 and back to
# write one token into it (the whole array, every step), and writes integers in place.
# The bits are read back as bfloat16 only in the slots a step attends to (`live`).
BITS_OF = {jnp.dtype(jnp.uint16): jnp.dtype(jnp.bfloat16)}


def as_held(x, dtype):
  """`x` (any shape and sharding, e.g. a step's new keys [B, K, D, L]) as a cache array of
  `dtype` holds it: converted, or as a bfloat16's bits (BITS_OF)."""
  dtype = jnp.dtype(dtype)
  if dtype in BITS_OF:
    return lax.bitcast_convert_type(x.astype(BITS_OF[dtype]), dtype)
  return x.astype(dtype)


def held_values(x):
  """The values a cache array `x` (any shape; its sharding kept) holds: bfloat16 for
  bits, else `x` itself."""
  return lax.bitcast_convert_type(x, BITS_OF[x.dtype]) if x.dtype in BITS_OF else x


def cache_spec(axis, ndim, slot_axis):
  """The sharding of a cache array (keys, values, their scales or positions, as above):
  batch over (data, fsdp), kv heads over tensor, slots (`slot_axis`) over `axis`."""
  names = [sharding.RULES["batch"]] + [None] * (ndim - 1)
  if ndim >= 3:
    names[1] = sharding.RULES["kv_heads"]
  names[slot_axis] = axis
  return jax.P(*names)


def cache_with_room(prefilled, room: int, fill, *, slot_axis: int, mesh, axis="sequence"):
  """Appends `room` empty slots to a sequence-sharded array, room / N on each device.

  Args:
    prefilled: a cache array of C slots (axis `slot_axis`; keys, values or positions,
      sharded as above).
    room: decode slots to add, a multiple of the ring size N.
    fill: the value of the new slots (0 for keys/values, EMPTY for positions).
  Returns:
    C + room slots, sharded like `prefilled`; device i holds its C/N prefilled slots
    followed by room/N empty ones.
  """
  ring_size = mesh.shape[axis]
  if room % ring_size:
    raise ValueError(f"decode room {room} is not a multiple of mesh.{axis}={ring_size}")
  spec = cache_spec(axis, prefilled.ndim, slot_axis)

  def local(x):
    shape = list(x.shape)
    shape[slot_axis] = room // ring_size
    return jnp.concatenate([x, jnp.full(shape, fill, x.dtype)], axis=slot_axis)

  return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)(prefilled)


def cache_write(cache, new, step, prompt_slots: int, *, slot_axis: int, mesh,
                axis="sequence"):
  """Writes the token of decode step `step` into its slot.

  Args:
    cache: a cache array (keys, values or positions) from `cache_with_room`; its first
      `prompt_slots` slots (prompt_slots / N per device) hold the prompt.
    new: the step's value, shaped like `cache` with 1 slot, not split over `axis`.
    step: int32 scalar, the decode step (0 for the token after the prompt).
  Returns:
    `cache` with slot (device step % N, local prompt_slots / N + step // N) replaced.
  """
  ring_size = mesh.shape[axis]
  spec = cache_spec(axis, cache.ndim, slot_axis)
  new_spec = jax.P(*(None if i == slot_axis else name for i, name in enumerate(spec)))

  def local(cache, new, step):
    start = [0] * cache.ndim
    start[slot_axis] = prompt_slots // ring_size + step // ring_size
    mine = lax.axis_index(axis) == step % ring_size
    old = lax.dynamic_slice(cache, start, new.shape)
    return lax.dynamic_update_slice(cache, jnp.where(mine, new, old), start)

  return jax.shard_map(local, mesh=mesh, in_specs=(spec, new_spec, jax.P()),
                       out_specs=spec, check_vma=False)(cache, as_held(new, cache.dtype), step)


def rolling_slot(token, capacity: int, kept: int):
  """The slot of token index `token` (int32 array) in a rolling row of `capacity` slots
  whose first `kept` are never reused (model/kv_cache.py, SlotCache)."""
  return jnp.where(token < kept, token, kept + (token - kept) % (capacity - kept))


def slot_write(cache, new, fill, *, slot_axis: int, mesh, axis="sequence", rolling=False,
               kept=0):
  """Writes L new slots into each row of a continuous-batching cache (model/kv_cache.py,
  SlotCache), row b at its own slot index fill[b].

  Global slot g of a row lives on device g % N of `axis`, at local index g // N, so a
  row's slots are spread evenly over the ring whatever its length.

  Args:
    cache: keys [B, K, D, C], values [B, K, C, D] or positions [B, C], slots (axis
      `slot_axis`) over `axis`, batch over (data, fsdp).
    new: shaped like `cache` with L slots, not split over `axis`.
    fill: [B] int32, the first slot to write in each row. With L > 1, L and every
      fill[b] are multiples of N (then device d writes L / N slots: the chunk's tokens
      d, d + N, ...).
    rolling: fill counts tokens, and token t goes to slot rolling_slot(t, C, kept)
      (kept and C multiples of N, so a token stays on device t % N).
  Returns:
    `cache` with slots fill[b] .. fill[b] + L - 1 of row b replaced.
  """
  ring_size = mesh.shape[axis]
  count = new.shape[slot_axis]
  capacity = cache.shape[slot_axis]
  if count > 1 and count % ring_size:
    raise ValueError(f"{count} slots written at once: not a multiple of mesh.{axis}={ring_size}")
  if rolling and (kept % ring_size or capacity % ring_size or capacity - kept < count):
    raise ValueError(f"a rolling cache of {capacity} slots keeping {kept} needs both multiples "
                     f"of mesh.{axis}={ring_size} and room for {count} new slots")
  spec = cache_spec(axis, cache.ndim, slot_axis)
  new_spec = jax.P(*(None if i == slot_axis else name for i, name in enumerate(spec)))

  def local(cache, new, fill):
    device = lax.axis_index(axis)
    if count > 1:  # this device's share of the chunk: its tokens d, d + N, ...
      shape = new.shape[:slot_axis] + (count // ring_size, ring_size) + new.shape[slot_axis + 1:]
      new = lax.dynamic_index_in_dim(new.reshape(shape), device, slot_axis + 1, keepdims=False)
      mine = jnp.ones_like(fill, bool)
      tokens = device + ring_size * jnp.arange(count // ring_size, dtype=jnp.int32)
    else:
      mine = fill % ring_size == device
      tokens = jnp.zeros((1,), jnp.int32)

    def row(cache, new, fill, mine):  # one row: the slot axis is slot_axis - 1
      axis_in_row = slot_axis - 1
      if rolling:  # a scatter: the slots may wrap around the row's end
        local_slots = rolling_slot(fill + tokens, capacity, kept) // ring_size
        moved, new = jnp.moveaxis(cache, axis_in_row, 0), jnp.moveaxis(new, axis_in_row, 0)
        moved = moved.at[local_slots].set(jnp.where(mine, new, moved[local_slots]))
        return jnp.moveaxis(moved, 0, axis_in_row)
      start = [0] * cache.ndim
      start[axis_in_row] = fill // ring_size
      old = lax.dynamic_slice(cache, start, new.shape)
      return lax.dynamic_update_slice(cache, jnp.where(mine, new, old), start)

    return jax.vmap(row)(cache, new, fill, mine)

  return jax.shard_map(local, mesh=mesh, in_specs=(spec, new_spec, jax.P(spec[0])),
                       out_specs=spec, check_vma=False)(cache, as_held(new, cache.dtype),
                                                        fill.astype(jnp.int32))


CHUNK_BLOCKS = (512, 256, 128)  # slots per block of a chunk's attention (_chunk_block)


def _finite(row_max):
  """Row maxima with -inf (a row that sees no slot) as 0, to subtract safely."""
  return jnp.where(row_max == -jnp.inf, 0.0, row_max)


def _masked_scores(grouped, q_scale, q_pos, k, kv_pos, k_scale, *, scale, window, sinks):
  """q.k of the queries and slots given, -inf where a slot is not visible: [B, K, G, L, C]
  float32. grouped: [B, K, G, L, D] queries (int8 with `q_scale` [B, K, G, L] for an int8
  cache); q_pos: [B, L]; k: [B, K, D, C] as held; kv_pos: [B, C]; k_scale: [B, K, C] or
  None (cache_attention's arguments)."""
  k = held_values(k)  # after any slice: only the slots attended
  if q_scale is not None:  # int8 cache: an int8 product with int32 sums
    scores = jnp.einsum("bkgld,bkdc->bkglc", grouped, k, preferred_element_type=jnp.int32)
    scores = (scores.astype(jnp.float32) * (q_scale[..., None] * scale)
              * k_scale[:, :, None, None, :])
  elif k_scale is not None:  # float8: widened, the key scales applied to the sums
    scores = jnp.einsum("bkgld,bkdc->bkglc", grouped, k.astype(grouped.dtype),
                        preferred_element_type=jnp.float32)
    scores = scores * scale * k_scale[:, :, None, None, :]
  else:
    # Products in the cache's dtype, accumulated in float32: a cache converted to
    # float32 here was a copy of the whole cache per layer and step (XLA:CPU).
    scores = jnp.einsum("bkgld,bkdc->bkglc", grouped.astype(k.dtype), k,
                        preferred_element_type=jnp.float32) * scale
  kv_pos, q_pos = kv_pos[:, None, :], q_pos[:, :, None]
  visible = kv_pos <= q_pos
  if window:
    visible &= (kv_pos > masking.window_start(q_pos, window)) | (kv_pos < sinks)
  return jnp.where(visible[:, None, None], scores, -jnp.inf)  # visible: [B, 1, 1, L, C]


def _weighted_values(weights, v, v_scale):
  """sum_c weights_c v_c: [B, K, G, L, D] float32, of weights [B, K, G, L, C] float32
  and v [B, K, C, D] as held (v_scale [B, K, C] folded into the weights, or None)."""
  v = held_values(v)
  if v_scale is not None:  # the scales folded into p, v widened to float32
    return jnp.einsum("bkglc,bkcd->bkgld", weights * v_scale[:, :, None, None, :],
                      v.astype(jnp.float32))
  return jnp.einsum("bkglc,bkcd->bkgld", weights.astype(v.dtype), v,
                    preferred_element_type=jnp.float32)


def _grouped(q, kv_heads: int):
  """Queries [B, L, H, D] as [B, K, G, L, D]: the G query heads of each kv head together."""
  batch, length, q_heads, head_dim = q.shape
  return jnp.moveaxis(q.reshape(batch, length, kv_heads, q_heads // kv_heads, head_dim), 1, 3)


def _chunk_block(length: int, slots: int) -> int:
  """Slots per block of the blockwise attention of `length` queries over `slots` slots
  (the largest of CHUNK_BLOCKS dividing them), or 0 for one pass: decode steps (one
  query) and slots of one block or less."""
  if length == 1:
    return 0
  return next((b for b in CHUNK_BLOCKS if slots > b and slots % b == 0), 0)


def _blockwise(scores_of, q_shape, k, v, kv_pos, k_scale, v_scale, q_pos, block):
  """(row maxima [B, K, G, L], numerator [B, K, G, L, D], denominator [B, K, G, L, 1]):
  the attention sums over the slots `block` at a time with an online softmax (both sums
  relative to the row maxima), up to the last slot visible to any query (q_shape: the
  grouped queries' [B, K, G, L, D]; scores_of(k, kv_pos, k_scale): _masked_scores of a
  block). A chunk at the start of a long staging row reads only what it fills, and no
  [L, C] score array is made. Measured on XLA:CPU, a 512-token chunk over 1,536 filled
  of 2,048 slots, one layer: 9 ms against 43 ms in one pass (scores of 32 MiB through
  memory 5 times)."""
  slots = k.shape[-1]
  slot_index = jnp.arange(slots, dtype=jnp.int32)
  # [B, C]: the slots that some query (not padding, at EMPTY) may see
  seen = kv_pos <= jnp.max(jnp.where(q_pos < EMPTY, q_pos, -1), axis=1, keepdims=True)
  used = jnp.max(jnp.where(seen, slot_index + 1, 0))
  take = lambda x, i, axis: None if x is None else lax.dynamic_slice_in_dim(
      x, i * block, block, axis)

  def body(i, carry):
    row_max, numerator, denominator = carry
    scores = scores_of(take(k, i, 3), take(kv_pos, i, 1), take(k_scale, i, 2))
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
    rescale = jnp.exp(row_max - _finite(new_max))[..., None]  # 0 while nothing was seen
    weights = jnp.exp(scores - _finite(new_max)[..., None])
    return (new_max,
            numerator * rescale + _weighted_values(weights, take(v, i, 2), take(v_scale, i, 2)),
            denominator * rescale + jnp.sum(weights, axis=-1, keepdims=True))

  *rows, head_dim = q_shape
  return lax.fori_loop(0, (used + block - 1) // block, body, (
      jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros((*rows, head_dim), jnp.float32),
      jnp.zeros((*rows, 1), jnp.float32)))


def cache_attention(q, k_cache, v_cache, cache_positions, q_positions, *, mesh,
                    axis="sequence", scale=None, live=0, live_rows=0, window=0, sinks=0,
                    k_scale=None, v_scale=None, row_slots=None, row_buckets=(), impl="auto"):
  """Attention of L new tokens per row over a sequence-sharded KV cache (a decode
  step: L = 1; a chunk of a prompt prefilled into a SlotCache: L > 1).

  Each device attends to its local slots; the partial results merge by log-sum-exp
  over `axis` (docs/design.md, "Decode over a sequence-sharded cache"): an all-reduce of
  the row maxima, then one of the rescaled numerators and denominators. Slots are
  matched to queries by position only, so their order never matters.

  Args:
    q: [B, L, H, D], batch over (data, fsdp), heads over tensor, whole on every device
      of `axis`.
    k_cache: [B, K, D, C] and v_cache: [B, K, C, D], H % K == 0, the C slots over
      `axis`.
    cache_positions: [B, C] int32 token position of each slot (EMPTY: none).
    q_positions: [B, L] int32; a slot is visible to a query when its position <= the
      query's (and, with a sliding `window`, > the query's - window, or < `sinks`).
    live: attend only to the first `live` global slots (a multiple of the ring size N:
      local slots [0, live / N) of every device, as ring.slot_write lays them out);
      0: all C. Slots beyond must hold nothing a query should see.
    live_rows: attend only for the first `live_rows` rows (0: all B); the others get
      zeros. Only on a mesh whose batch axes are 1 (the rows are whole on every device).
    k_scale, v_scale: [B, K, C] float32, sharded as the slots, for a quantized cache
      (model/kv_cache.py: slot c of head k holds values * scale). An int8 cache: the
      queries are rounded to int8 too (one scale per query and head), so q.k is an int8
      product with int32 sums (native on CPU and TPU). A float8 cache: the keys widened
      to the queries' dtype (exact for bf16). p.v folds the value scales into p.
    row_slots, row_buckets: ragged rows (a ring of 1 only): row b attends only to the
      first row_buckets[i] slots, the smallest bucket >= row_slots[b] ([B] int32; 0: the
      row gets zeros), chosen at run time, one row at a time (lax.switch). The buckets
      ascend; the last bounds every row. For XLA:CPU, which runs a batched product's
      small products one after another on one thread: a batch of rows then costs what
      its longest row holds times the rows, and ragged rows what each row holds (8
      decode rows of 40-1536 tokens, one layer: 0.77 ms against 2.5 ms at a 2048-slot
      `live`, the same values).
    impl: "auto" runs the attention of few queries (G * L <= 64 per kv head: decode
      steps) on a CPU mesh in the C++ kernel parallel/kernels/cpu_decode.py when it
      builds, which reads each row up to its last visible slot (so `live`, row_slots and
      row_buckets only bound it) and uses both cores; anything else (or "xla"): XLA.
  Returns:
    [B, L, H, D] in q.dtype, sharded like q.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  batch_axes = sharding.RULES["batch"]
  q_spec = jax.P(batch_axes, None, sharding.RULES["heads"], None)
  k_spec, v_spec = cache_spec(axis, 4, KEY_SLOTS), cache_spec(axis, 4, VALUE_SLOTS)

  ring_size = mesh.shape[axis]
  if live and (live % ring_size or live > k_cache.shape[-1]):
    raise ValueError(f"live={live} must be a multiple of the ring ({ring_size}) and at most "
                     f"the cache's {k_cache.shape[-1]} slots")

  if live_rows and any(mesh.shape[name] > 1 for name in batch_axes):
    raise ValueError(f"live_rows={live_rows} needs the batch axes {batch_axes} of size 1")
  if row_slots is not None and (ring_size > 1 or not row_buckets
                                or row_buckets[-1] > k_cache.shape[-1]):
    raise ValueError(f"ragged rows need a ring of 1 (not {ring_size}) and buckets of at "
                     f"most the cache's {k_cache.shape[-1]} slots (got {row_buckets})")

  is_quantized = k_scale is not None
  scale_spec = cache_spec(axis, 3, SCALE_SLOTS)
  q_rows = q.shape[1] * q.shape[2] // k_cache.shape[1]  # G * L per kv head
  use_kernel = (impl == "auto" and platform_of(mesh) == "cpu"
                and cpu_decode.supports(q_rows, k_cache.dtype) and cpu_decode.available())

  def attend(q, k, v, kv_pos, q_pos, k_scale, v_scale):
    """The rows' attention over the slots given, merged over the ring: in one pass, or
    for a chunk of L > 1 queries over more than a block of slots, block by block
    (`_blockwise`)."""
    grouped = _grouped(q, k.shape[1])
    q_scale = None
    if is_quantized and k.dtype == jnp.int8:
      grouped, q_scale = quantized.quantize(grouped, 4)  # [B, K, G, L]
    scores_of = functools.partial(_masked_scores, grouped, q_scale, q_pos, scale=scale,
                                  window=window, sinks=sinks)
    slot_block = _chunk_block(q.shape[1], k.shape[-1])
    if slot_block:
      out_max, numerator, denominator = _blockwise(scores_of, grouped.shape, k, v, kv_pos,
                                                   k_scale, v_scale, q_pos, slot_block)
    else:
      scores = scores_of(k, kv_pos, k_scale)
      out_max = jnp.max(scores, axis=-1)  # [B, K, G, L]
      weights = jnp.exp(scores - _finite(out_max)[..., None])
      denominator = jnp.sum(weights, axis=-1, keepdims=True)
      numerator = _weighted_values(weights, v, v_scale)
    return merged(out_max, numerator, denominator, q.dtype)

  def merged(out_max, numerator, denominator, dtype):
    """[B, L, H, D] in `dtype`: the sums (row maxima [B, K, G, L], numerator [B, K, G, L,
    D], denominator [B, K, G, L, 1], relative to the maxima) merged over the ring and
    divided."""
    if ring_size > 1:  # the merge: both sums relative to the ring's maxima, one all-reduce
      factor = jnp.exp(out_max - _finite(lax.pmax(out_max, axis)))[..., None]
      numerator, denominator = lax.psum((numerator * factor, denominator * factor), axis)
    out = numerator / jnp.where(denominator == 0, 1.0, denominator)  # [B, K, G, L, D]
    batch, kv_heads, groups, length, head_dim = out.shape
    return jnp.moveaxis(out, 3, 1).reshape(batch, length, kv_heads * groups,
                                           head_dim).astype(dtype)

  def first_slots(arrays, used):
    """(k, v, kv_pos, k_scale, v_scale) cut to their first `used` local slots."""
    k, v, kv_pos, k_scale, v_scale = arrays
    if is_quantized:
      k_scale, v_scale = k_scale[..., :used], v_scale[..., :used]
    return k[..., :used], v[:, :, :used], kv_pos[:, :used], k_scale, v_scale

  def ragged(q, arrays, q_pos, row_slots):
    """Each row over its own bucket: [B, L, H, D]."""
    def row_in(b, size, q, arrays, q_pos):
      one = lambda x: None if x is None else x[b:b + 1]
      if not size:
        return jnp.zeros(q.shape[1:], q.dtype)
      k, v, kv_pos, k_scale, v_scale = first_slots([one(x) for x in arrays], size)
      return attend(one(q), k, v, kv_pos, one(q_pos), k_scale, v_scale)[0]
    sizes = (0,) + tuple(row_buckets)
    # the branch of each row: 0 for no slots, else 1 + the first bucket holding them
    index = jnp.where(row_slots > 0, 1 + jnp.searchsorted(
        jnp.asarray(row_buckets, jnp.int32), row_slots), 0)
    index = jnp.minimum(index, len(sizes) - 1)
    return jnp.stack([
        lax.switch(index[b], [functools.partial(row_in, b, size) for size in sizes],
                   q, arrays, q_pos)
        for b in range(q.shape[0])])

  def in_kernel(q, k, v, kv_pos, q_pos, k_scale, v_scale, row_slots):
    """cpu_decode's sums over the whole local arrays (a slice would be a copy), each row
    bounded by its own limit, merged over the ring as `attend` merges them."""
    rows = q.shape[0]
    limit = (row_slots if row_slots is not None
             else jnp.full((rows,), live // ring_size if live else k.shape[-1], jnp.int32))
    if live_rows:
      limit = jnp.where(jnp.arange(rows) < live_rows, limit, 0)
    out_max, numerator, denominator = cpu_decode.attend(
        _grouped(q, k.shape[1]), q_pos, k, v, kv_pos, k_scale, v_scale, limit, scale=scale, window=window,
        sinks=sinks, empty=EMPTY)
    return merged(out_max, numerator, denominator, q.dtype)

  def local(q, k, v, kv_pos, q_pos, *rest):
    rest = list(rest)
    k_scale, v_scale = (rest.pop(0), rest.pop(0)) if is_quantized else (None, None)
    row_slots = rest.pop(0) if rest else None
    if use_kernel:
      return in_kernel(q, k, v, kv_pos, q_pos, k_scale, v_scale, row_slots)
    rows = q.shape[0]
    arrays = [k, v, kv_pos, k_scale, v_scale]
    if row_slots is not None:  # the whole arrays into the branches: a slice is a copy
      if live_rows:
        row_slots = jnp.where(jnp.arange(rows) < live_rows, row_slots, 0)
      return ragged(q, arrays, q_pos, row_slots)
    if live_rows and live_rows < rows:
      q, q_pos = q[:live_rows], q_pos[:live_rows]
      arrays = [None if x is None else x[:live_rows] for x in arrays]
    if live:
      arrays = first_slots(arrays, live // ring_size)
    k, v, kv_pos, k_scale, v_scale = arrays
    out = attend(q, k, v, kv_pos, q_pos, k_scale, v_scale)
    if out.shape[0] < rows:
      out = jnp.concatenate([out, jnp.zeros((rows - out.shape[0], *out.shape[1:]), out.dtype)])
    return out

  specs = (q_spec, k_spec, v_spec, jax.P(batch_axes, axis), jax.P(batch_axes))
  args = (q, k_cache, v_cache, cache_positions.astype(jnp.int32), q_positions.astype(jnp.int32))
  if is_quantized:
    specs, args = specs + (scale_spec, scale_spec), args + (k_scale, v_scale)
  if row_slots is not None:
    specs, args = specs + (jax.P(batch_axes),), args + (row_slots.astype(jnp.int32),)
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec,
                       check_vma=False)(*args)
