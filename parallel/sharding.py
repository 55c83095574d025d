"""Logical axis names -> mesh axes: the one table that decides how arrays are split.

Parameters carry their logical axes as `logical_axes` metadata on their nnx.Param
(e.g. the query projection is ("embed", "heads", "head_dim")); activations name
theirs where the model constrains them. Nothing outside `parallel/` names a mesh axis.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from parallel import layout

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
RULES = {
    "batch": ("data", "fsdp"),  # activations: rows of the global batch
    "sequence": "sequence",     # activations: tokens, split over the ring
    "heads": "tensor",          # query heads (parameters and activations)
    "kv_heads": "tensor",       # key/value heads
    "mlp": "tensor",            # SwiGLU hidden units
    "vocab": "tensor",          # embedding rows and logits columns
    "embed": "fsdp",            # parameters' model dimension (ZeRO-3 style)
    "act_embed": None,          # activations' model dimension stays whole
    "head_dim": None,
    "norm": None,               # RMSNorm scales: tiny, replicated
}


def tokens_axis(length: int) -> str | None:
  """The logical axis of an activation's token dimension of `length` tokens per row: split
  over the ring ("sequence"), unless a row holds one token (a decode step, a prompt's
  last token), which stays whole on every device of the ring."""
  return "sequence" if length > 1 else None


# Training's parameters, gradients and optimizer state may also be split over the ring
# (train.shard_state_over_sequence): ZeRO-3 over fsdp x sequence, as LWM and MaxText do.
# Without it every device of a ring of 16 holds the same 1/fsdp of the state.
STATE_OVER_SEQUENCE = {"embed": ("fsdp", "sequence")}


def spec(logical_axes, rules=None) -> PartitionSpec:
  """PartitionSpec for an array whose dimensions have these logical names (`rules`:
  overrides of RULES, e.g. STATE_OVER_SEQUENCE)."""
  rules = RULES | (rules or {})
  return PartitionSpec(*(rules[name] if name is not None else None for name in logical_axes))


def named_sharding(mesh, logical_axes) -> NamedSharding:
  return NamedSharding(mesh, spec(logical_axes))


def constrain(x, mesh, logical_axes):
  """`with_sharding_constraint` by logical names; a no-op without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes))


def _is_variable(x):
  return isinstance(x, nnx.Variable)


def param_specs(state, *, over_sequence: bool = False):
  """Tree of PartitionSpecs for an nnx.State of Params with `logical_axes` metadata;
  `over_sequence`: the model dimension split over fsdp x sequence (STATE_OVER_SEQUENCE)."""
  rules = STATE_OVER_SEQUENCE if over_sequence else None
  return jax.tree.map(lambda var: spec(var.get_metadata()["logical_axes"], rules), state,
                      is_leaf=_is_variable)


def param_shardings(state, mesh, *, over_sequence: bool = False):
  """Tree of NamedShardings on `mesh` for an nnx.State of Params (`over_sequence` as for
  `param_specs`)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      param_specs(state, over_sequence=over_sequence))


def host_rows(sharding: NamedSharding, global_shape) -> tuple[int, int]:
  """(first_row, rows): the rows of a [B, ...] global batch this process's devices hold.

  Processes whose devices hold the same rows (e.g. when the sequence axis spans hosts)
  get the same range and read the same data.
  """
  spans = [index[0].indices(global_shape[0])[:2] for device, index in
           sharding.devices_indices_map(tuple(global_shape)).items()
           if device.process_index == jax.process_index()]
  first, last = min(s[0] for s in spans), max(s[1] for s in spans)
  return first, last - first


def put_rows(rows, mesh, logical_axes, global_rows: int | None = None, first_row: int = 0):
  """Host rows -> one global jax.Array on `mesh`, split by `logical_axes`: the one way
  host data gets onto the mesh (training batches, evaluation rows, serving requests).

  Args:
    rows: NumPy [R, ...]: rows [first_row, first_row + R) of the global array, as this
      process holds them. One host, or every host holding the whole array: R = B,
      first_row = 0. Several hosts each reading their own rows: `host_rows` says which.
    logical_axes: names of the array's dimensions, e.g. ("batch", "sequence").
    global_rows: B, the global row count (default R: this process holds every row).
  Returns:
    [B, ...] jax.Array; each device gets its shard from this process's rows.
  """
  rows = np.asarray(rows)
  shape = (rows.shape[0] if global_rows is None else global_rows, *rows.shape[1:])

  def shard(index):  # index: this device's global slices
    start, stop = index[0].indices(shape[0])[:2]
    return rows[(slice(start - first_row, stop - first_row), *index[1:])]

  return jax.make_array_from_callback(shape, named_sharding(mesh, logical_axes), shard)


def put_batch(batch: dict, mesh, global_rows: int | None = None, first_row: int = 0,
              order: str = "zigzag") -> dict:
  """A batch of [R, L] token arrays (inputs, targets, positions, segment ids, ...) in
  natural order -> global [B, L] arrays sharded ("batch", "sequence"), the tokens in
  zigzag order over the ring (parallel/layout.py) when mesh.sequence > 1, unless
  `order` is "natural" (layout.order_for). Arguments as for `put_rows`."""
  ring = mesh.shape["sequence"] if order == "zigzag" else 1
  return {key: put_rows(layout.to_zigzag(np.asarray(value), ring), mesh, ("batch", "sequence"),
                        global_rows, first_row)
          for key, value in batch.items()}
