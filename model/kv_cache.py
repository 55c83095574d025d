"""The KV cache of decoding: what the forward wrote for the prompt, plus room to grow.

Dimension letters: core/__init__.py.

Per layer a key array [B, K, D, C] and a value array [B, K, C, D], and the
position of the token in every slot ([B, C], `ring.EMPTY` for padding and unused
slots). The split is
the forward's own: batch over (data, fsdp), kv heads over tensor, slots over
`sequence` (a long prompt's cache stays spread over the ring where its prefill
computed it).
parallel/ring.py describes which device holds which slot.
"""

import dataclasses

import jax
import jax.numpy as jnp

from parallel import ring


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  keys: tuple       # per layer [B, K, D, C], RoPE applied (slots minor: q.k reads them in a row)
  values: tuple     # per layer [B, K, C, D]
  positions: jax.Array  # [B, C] int32 token position of each slot
  step: jax.Array   # int32 scalar: decode steps written so far
  prompt_slots: int = dataclasses.field(metadata=dict(static=True))  # slots of the prompt

  @property
  def capacity(self) -> int:
    return self.positions.shape[1]


def from_prefill(layer_kv, positions, valid, room: int, mesh) -> KVCache:
  """The cache after a prefill.

  Args:
    layer_kv: per layer (k, v), each [B, L, K, D] as the forward computed them for the
      L prompt tokens (batch over (data, fsdp), L over sequence).
    positions: [B, L] int32 positions of the prompt tokens (same order and sharding).
    valid: [B, L] bool, False at padding (its slots are never attended to).
    room: decode slots to add, a multiple of mesh.sequence.
  """
  grow = lambda x, fill, slot_axis: ring.cache_with_room(x, room, fill, slot_axis=slot_axis,
                                                         mesh=mesh)
  keys = lambda k: jnp.transpose(k, (0, 2, 3, 1))  # [B, L, K, D] -> [B, K, D, L]: L slots
  values = lambda v: jnp.swapaxes(v, 1, 2)        # [B, L, K, D] -> [B, K, L, D]
  return KVCache(keys=tuple(grow(keys(k), 0, ring.KEY_SLOTS) for k, _ in layer_kv),
                 values=tuple(grow(values(v), 0, ring.VALUE_SLOTS) for _, v in layer_kv),
                 positions=grow(jnp.where(valid, positions, ring.EMPTY).astype(jnp.int32),
                                ring.EMPTY, ring.POSITION_SLOTS),
                 step=jnp.zeros((), jnp.int32), prompt_slots=positions.shape[1])


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
  mesh.sequence), sharded as ring.slot_write expects; `config` is the ModelConfig.
  rolling / kept: see SlotCache."""
  spec = lambda ndim, slot_axis: ring.cache_spec("sequence", ndim, slot_axis)
  place = lambda shape, dtype, value, slot_axis: jax.device_put(
      jnp.full(shape, value, dtype),
      jax.sharding.NamedSharding(mesh, spec(len(shape), slot_axis)))
  kv_heads, head_dim = config.n_kv_heads, config.head_dim
  return SlotCache(
      keys=tuple(place((slots, kv_heads, head_dim, capacity), config.dtype, 0, ring.KEY_SLOTS)
                 for _ in range(config.n_layers)),
      values=tuple(place((slots, kv_heads, capacity, head_dim), config.dtype, 0,
                         ring.VALUE_SLOTS) for _ in range(config.n_layers)),
      positions=place((slots, capacity), jnp.int32, ring.EMPTY, ring.POSITION_SLOTS),
      fill=jax.device_put(jnp.zeros((slots,), jnp.int32),
                          jax.sharding.NamedSharding(mesh, jax.P(spec(2, 1)[0]))),
      rolling=rolling, kept=kept)
