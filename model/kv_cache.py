"""The KV cache of decoding: what the forward wrote for the prompt, plus room to grow.

Dimension letters: core/__init__.py.

Per layer a key array [B, K, D, C] and a value array [B, K, C, D], and the
position of the token in every slot ([B, C], `ring.EMPTY` for padding and unused
slots). The split is
the forward's own: batch over (data, fsdp), kv heads over tensor, slots over
`sequence` (a long prompt's cache stays spread over the ring where its prefill
computed it).
parallel/ring.py describes which device holds which slot.

The cache's dtype is `ModelConfig.kv_cache_dtype` (`cache_dtype`). A quantized cache
(int8, or float8_e4m3fn: `SCALED`) holds each token's key and value per kv head in
that dtype with one float32 scale (parallel/quantized.py): per layer `key_scales` and
`value_scales` [B, K, C], sharded as the slots; a float cache has none (empty tuples).
"""

import dataclasses

import jax
import jax.numpy as jnp

from parallel import quantized, ring
from parallel.kernels import cpu_decode


# Cache dtypes stored with one float32 scale per token and kv head.
SCALED = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def cache_dtype(config):
  """The dtype of the values the cache of a model of `config` (ModelConfig) holds."""
  return jnp.dtype(config.kv_cache_dtype or config.dtype)


def held_dtype(dtype, mesh, *, live_slices: bool):
  """The dtype a cache of `dtype` values is stored in on `mesh`: `dtype`, except bfloat16
  on CPU, which XLA:CPU widens to float32 and back to write one token into (the whole
  array, every step). There the cache holds the bits (uint16; parallel/ring.BITS_OF)
  when its reader takes them where they lie: the C++ decode kernel
  (parallel/kernels/cpu_decode.py, read as it goes), or attention over a live slice
  (SlotCache: `live`, read back as bfloat16 only in the slice). A cache read whole by
  XLA (KVCache without the kernel) holds float32, since converting all of it per step
  cost more than the halved reads saved (measured on bench/decode.py's 58M model,
  2026-12-06, 32 rows x 384 slots: decode 6.3 s with bits against 5.3 s in float32)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16 and ring.platform_of(mesh) == "cpu":
    bits = live_slices or cpu_decode.available()
    return jnp.dtype(jnp.uint16 if bits else jnp.float32)
  return dtype


def slot_arrays(cache) -> list:
  """[(field, layer or None, array, slot axis)] of every array of a KVCache or
  SlotCache that has a slot axis: keys, values, their scales (int8) and positions."""
  out = []
  for field, slot_axis in (("keys", ring.KEY_SLOTS), ("values", ring.VALUE_SLOTS),
                           ("key_scales", ring.SCALE_SLOTS),
                           ("value_scales", ring.SCALE_SLOTS)):
    out += [(field, layer, array, slot_axis)
            for layer, array in enumerate(getattr(cache, field))]
  return out + [("positions", None, cache.positions, ring.POSITION_SLOTS)]


def with_slot_arrays(cache, arrays: list):
  """`cache` with the arrays of `slot_arrays(cache)` replaced by `arrays` (same order)."""
  fields = {}
  for (field, layer, _, _), array in zip(slot_arrays(cache), arrays):
    if layer is None:
      fields[field] = array
    else:
      fields[field] = fields.get(field, ()) + (array,)
  return dataclasses.replace(cache, **fields)


def write_layer(cache, layer: int, k, v, write) -> tuple:
  """(keys, values, key scales, value scales) of `layer` after writing the new tokens'
  k, v [B, L, K, D] with `write(array, new, slot_axis)` (the scales None for a float
  cache). Quantized here when the cache is (SCALED)."""
  k, v = jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2)  # [B,K,D,L], [B,K,L,D]
  if not cache.key_scales:
    return (write(cache.keys[layer], k, ring.KEY_SLOTS),
            write(cache.values[layer], v, ring.VALUE_SLOTS), None, None)
  dtype = cache.keys[layer].dtype
  (k, k_scale), (v, v_scale) = quantized.quantize(k, 2, dtype), quantized.quantize(v, 3, dtype)
  return (write(cache.keys[layer], k, ring.KEY_SLOTS),
          write(cache.values[layer], v, ring.VALUE_SLOTS),
          write(cache.key_scales[layer], k_scale, ring.SCALE_SLOTS),
          write(cache.value_scales[layer], v_scale, ring.SCALE_SLOTS))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  keys: tuple       # per layer [B, K, D, C], RoPE applied (slots minor: q.k reads them in a row)
  values: tuple     # per layer [B, K, C, D]
  positions: jax.Array  # [B, C] int32 token position of each slot
  step: jax.Array   # int32 scalar: decode steps written so far
  prompt_slots: int = dataclasses.field(metadata=dict(static=True))  # slots of the prompt
  key_scales: tuple = ()    # SCALED cache: per layer [B, K, C] float32 (else empty)
  value_scales: tuple = ()

  @property
  def capacity(self) -> int:
    return self.positions.shape[1]


def from_prefill(layer_kv, positions, valid, room: int, mesh, dtype=None) -> KVCache:
  """The cache after a prefill.

  Args:
    layer_kv: per layer (k, v), each [B, L, K, D] as the forward computed them for the
      L prompt tokens (batch over (data, fsdp), L over sequence).
    positions: [B, L] int32 positions of the prompt tokens (same order and sharding).
    valid: [B, L] bool, False at padding (its slots are never attended to).
    room: decode slots to add, a multiple of mesh.sequence.
    dtype: the cache's dtype (`cache_dtype`; None: the keys' own); SCALED ones quantize.
  """
  grow = lambda x, fill, slot_axis: ring.cache_with_room(x, room, fill, slot_axis=slot_axis,
                                                         mesh=mesh)
  dtype = jnp.dtype(dtype or layer_kv[0][0].dtype)
  keys = lambda k: jnp.transpose(k, (0, 2, 3, 1))  # [B, L, K, D] -> [B, K, D, L]: L slots
  values = lambda v: jnp.swapaxes(v, 1, 2)        # [B, L, K, D] -> [B, K, L, D]
  if dtype in SCALED:
    rounded = [(quantized.quantize(keys(k), 2, dtype), quantized.quantize(values(v), 3, dtype))
               for k, v in layer_kv]
    scales = dict(key_scales=tuple(grow(ks, 0, ring.SCALE_SLOTS) for (_, ks), _ in rounded),
                  value_scales=tuple(grow(vs, 0, ring.SCALE_SLOTS) for _, (_, vs) in rounded))
    layer_kv = [(k, v) for (k, _), (v, _) in rounded]
  else:
    scales = {}
    held = held_dtype(dtype, mesh, live_slices=False)
    layer_kv = [(ring.as_held(keys(k), held), ring.as_held(values(v), held))
                for k, v in layer_kv]
  return KVCache(keys=tuple(grow(k, 0, ring.KEY_SLOTS) for k, _ in layer_kv),
                 values=tuple(grow(v, 0, ring.VALUE_SLOTS) for _, v in layer_kv),
                 positions=grow(jnp.where(valid, positions, ring.EMPTY).astype(jnp.int32),
                                ring.EMPTY, ring.POSITION_SLOTS),
                 step=jnp.zeros((), jnp.int32), prompt_slots=positions.shape[1], **scales)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotCache:
  """The cache of continuous batching (serving/slots.py): one row B per decode slot, each
  with its own fill, so a request joins and leaves a row while the others decode.

  Row b's tokens (prompt chunks, then decoded tokens) take slots fill[b], fill[b] + 1,
  ... in order; global slot g lives on device g % N of `sequence`, at local index
  g // N (ring.slot_write). A slot's position says which queries see it (EMPTY:
  none), so a prompt's padding and a finished request's leftovers are never attended
  once their positions are cleared (`clear_from`).

  Rolling (a sliding-window model, every layer windowed): token t of a row goes to slot
  t while t < C, and after that to kept + (t - kept) mod (C - kept): the first `kept`
  slots (the sink tokens, rounded up to the ring) stay, the others are reused in turn,
  so a row holds the last C - kept tokens however long its context grows
  (`rolling_slot`). Attention masks by position, so the order of slots never matters.
  """
  keys: tuple           # per layer [B, K, D, C], RoPE applied
  values: tuple         # per layer [B, K, C, D]
  positions: jax.Array  # [B, C] int32
  fill: jax.Array       # [B] int32: the next token index (slot, until a rolling row wraps)
  # Slots attended: only the first `live` global slots of every row (0: all C), a
  # multiple of the ring, so that a step reads the part of the cache in use, not all
  # of it. Static: each value is its own compiled program (serving/slots.py buckets it).
  live: int = dataclasses.field(default=0, metadata=dict(static=True))
  # Rows attended: only the first `live_rows` (0: all B); the others' attention output is
  # zeros (rows that are not decoding). Static, as `live`.
  live_rows: int = dataclasses.field(default=0, metadata=dict(static=True))
  # Rolling (above): reuse slots past C; `kept` slots at the start are never reused.
  rolling: bool = dataclasses.field(default=False, metadata=dict(static=True))
  kept: int = dataclasses.field(default=0, metadata=dict(static=True))
  key_scales: tuple = ()    # SCALED cache: per layer [B, K, C] float32 (else empty)
  value_scales: tuple = ()
  # Ragged rows (ring.cache_attention; XLA:CPU): row b attends only to the smallest of
  # `row_buckets` (static, ascending) holding row_slots[b] slots ([B] int32; 0: none);
  # None: every row to the first `live` slots.
  row_slots: jax.Array | None = None
  row_buckets: tuple = dataclasses.field(default=(), metadata=dict(static=True))

  @property
  def capacity(self) -> int:
    return self.positions.shape[1]

  def write(self, array, new, slot_axis: int, mesh):
    """ring.slot_write of `new` (L tokens per row) into one of this cache's arrays at
    the rows' fills, rolling as this cache does."""
    return ring.slot_write(array, new, self.fill, slot_axis=slot_axis, mesh=mesh,
                           rolling=self.rolling, kept=self.kept)

  def clear_from(self, mesh, axis="sequence") -> "SlotCache":
    """Every slot at or after its row's fill made invisible (positions EMPTY). (A
    rolling row is cleared only before it wraps, when a request starts in it.)"""
    ring_size = mesh.shape[axis]
    local_slots = self.capacity // ring_size
    # Global slot index of every [B, C] entry in the layout above: slot (l, d) -> l*N + d,
    # stored at column d * (C / N) + l.
    column = jnp.arange(self.capacity, dtype=jnp.int32)
    global_slot = (column % local_slots) * ring_size + column // local_slots
    positions = jnp.where(global_slot[None, :] >= self.fill[:, None], ring.EMPTY,
                          self.positions)
    return dataclasses.replace(self, positions=positions)


def empty_slots(config, mesh, slots: int, capacity: int, *, rolling=False,
                kept=0) -> SlotCache:
  """An empty SlotCache of `slots` rows of `capacity` slots (a multiple of
  mesh.sequence), sharded as ring.slot_write expects, holding `cache_dtype(config)`;
  `config` is the ModelConfig. rolling / kept: see SlotCache."""
  spec = lambda ndim, slot_axis: ring.cache_spec("sequence", ndim, slot_axis)
  place = lambda shape, dtype, value, slot_axis: jax.device_put(
      jnp.full(shape, value, dtype),
      jax.sharding.NamedSharding(mesh, spec(len(shape), slot_axis)))
  kv_heads, head_dim, layers = config.n_kv_heads, config.head_dim, range(config.n_layers)
  dtype = held_dtype(cache_dtype(config), mesh, live_slices=True)
  scales = {}
  if dtype in SCALED:
    scales = {field: tuple(place((slots, kv_heads, capacity), jnp.float32, 0, ring.SCALE_SLOTS)
                           for _ in layers) for field in ("key_scales", "value_scales")}
  return SlotCache(
      keys=tuple(place((slots, kv_heads, head_dim, capacity), dtype, 0, ring.KEY_SLOTS)
                 for _ in layers),
      values=tuple(place((slots, kv_heads, capacity, head_dim), dtype, 0, ring.VALUE_SLOTS)
                   for _ in layers),
      positions=place((slots, capacity), jnp.int32, ring.EMPTY, ring.POSITION_SLOTS),
      fill=jax.device_put(jnp.zeros((slots,), jnp.int32),
                          jax.sharding.NamedSharding(mesh, jax.P(spec(2, 1)[0]))),
      rolling=rolling, kept=kept, **scales)


def per_token_bytes(config) -> int:
  """Cache bytes of one token over all layers: keys, values (and their scales when
  SCALED), and its position."""
  dtype = cache_dtype(config)
  per_head = 2 * (config.head_dim * dtype.itemsize + (4 if dtype in SCALED else 0))
  return config.n_layers * config.n_kv_heads * per_head + 4
