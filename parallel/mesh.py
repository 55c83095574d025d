"""The device mesh (axes data, fsdp, sequence, tensor) and every divisibility rule.

`make_mesh` builds the mesh from the config's axis sizes (one of them may be -1:
it takes the remaining devices). `validate` checks a model config, mesh, sequence
length and batch size together before anything is compiled, and raises one
`ConfigError` naming the field, its value and a value that would work.
"""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from core.errors import ConfigError

AXES = ("data", "fsdp", "sequence", "tensor")


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def resolve_axis_sizes(sizes: dict, num_devices: int) -> dict:
  """Fills the one -1 axis so the product is `num_devices`; checks the product."""
  sizes = {axis: int(sizes.get(axis, 1)) for axis in AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}={size} must be a positive size or -1")
    if size > 0 and num_devices % size:
      raise ConfigError(f"mesh.{axis}={size} does not divide the {num_devices} devices; "
                        f"use one of {_divisors(num_devices)}")
  fixed = math.prod(size for size in sizes.values() if size > 0)
  if fill:
    if num_devices % fixed:
      raise ConfigError(f"mesh: the fixed axes multiply to {fixed}, which does not divide the "
                        f"{num_devices} devices, so mesh.{fill[0]}=-1 cannot fill them")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"mesh: data*fsdp*sequence*tensor = {fixed} but there are {num_devices} devices; "
        "make the product equal the device count, or set one axis to -1 to fill")
  return sizes


def make_mesh(sizes: dict | None = None, devices=None) -> Mesh:
  """A Mesh with axes (data, fsdp, sequence, tensor) from the config's mesh section
  `{axis: size (-1 fills), "allow_split_physical_axes": bool}`.

  On TPU the mesh is laid on the slice's physical torus (`device_grid`). Axes are
  `Auto` (GSPMD propagation); only `parallel/` code names them.
  """
  sizes = dict(sizes or {"data": -1})
  devices = jax.devices() if devices is None else list(devices)
  resolved = resolve_axis_sizes(sizes, len(devices))
  grid = device_grid(tuple(resolved[axis] for axis in AXES), devices,
                     allow_split=bool(sizes.get("allow_split_physical_axes", False)))
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def device_grid(shape: tuple, devices: list, *, allow_split: bool = False) -> np.ndarray:
  """`devices` arranged as `shape` (data, fsdp, sequence, tensor).

  TPU chips sit on a 2D or 3D torus. Each mesh axis must then be a product of whole
  physical axes: the axes that talk most (tensor, then the ring, `sequence`) get the
  physical axes first, and a ring on a whole physical axis keeps its wrap-around link.
  A shape that needs a physical axis split is refused with shapes that fit, unless
  `allow_split` (mesh.allow_split_physical_axes). Other platforms: the devices in order.
  """
  if devices[0].platform != "tpu":
    return np.asarray(devices).reshape(shape)
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=allow_split)
  except (NotImplementedError, ValueError, AssertionError):
    pass
  physical = "x".join(str(max(d.coords[i] for d in devices) + 1)
                      for i in range(len(devices[0].coords)))
  asked = ", ".join(f"{axis}={size}" for axis, size in zip(AXES, shape) if size > 1)
  raise ConfigError(
      f"mesh: {asked} cannot be laid on this TPU slice's {physical} chips without splitting "
      "a physical axis (each mesh axis must be a product of whole physical axes); shapes "
      f"that fit: {'; '.join(_shapes_that_fit(shape, devices))}; or set "
      "--config.mesh.allow_split_physical_axes=True (a split axis loses its wrap-around link)")


def _shapes_that_fit(shape: tuple, devices: list, count: int = 3) -> list[str]:
  """The `count` shapes of the same device count nearest to `shape` that lay out whole."""
  n = len(devices)
  candidates = [(a, b, c, n // (a * b * c)) for a in _divisors(n) for b in _divisors(n // a)
                for c in _divisors(n // (a * b))]
  distance = lambda other: sum(abs(math.log2(x / y)) for x, y in zip(other, shape))
  fits = []
  for other in sorted(candidates, key=distance):
    try:
      mesh_utils.create_device_mesh(other, devices)
    except (NotImplementedError, ValueError, AssertionError):
      continue
    fits.append(" ".join(f"mesh.{axis}={size}" for axis, size in zip(AXES, other)))
    if len(fits) == count:
      break
  return fits


def validate(model, mesh: Mesh, *, seq_len: int | None = None,
             batch_size: int | None = None, state_over_sequence: bool = False) -> None:
  """Raises ConfigError if the model (a model.config.ModelConfig), sequence length or
  batch cannot run on `mesh` (`state_over_sequence`: training's
  train.shard_state_over_sequence, the model dimension split over fsdp x sequence)."""
  data, fsdp, sequence, tensor = (mesh.shape[axis] for axis in AXES)

  def multiple(field, value, of, why, note=""):
    if value % of:
      good = [of * m for m in range(max(1, value // of), value // of + 2)]
      raise ConfigError(f"{field}={value} must be a multiple of {why}={of}{note}; "
                        f"e.g. {' or '.join(map(str, good))}")

  if model.n_kv_heads % tensor:
    raise ConfigError(f"model.n_kv_heads={model.n_kv_heads} is not divisible by mesh.tensor="
                      f"{tensor}; use mesh.tensor in {_divisors(model.n_kv_heads)}")
  # (n_heads is a multiple of n_kv_heads, so the query heads split evenly too.)
  multiple("model.mlp_dim", model.mlp_dim, tensor, "mesh.tensor")
  multiple("model.vocab_size", model.vocab_size, tensor, "mesh.tensor")
  if state_over_sequence:
    multiple("model.dim", model.dim, fsdp * sequence, "mesh.fsdp*mesh.sequence",
             " (or --config.train.shard_state_over_sequence=False)")
  else:
    multiple("model.dim", model.dim, fsdp, "mesh.fsdp")
  if seq_len is not None and sequence > 1:
    multiple("data.seq_len", seq_len, 2 * sequence, "2*mesh.sequence", " (zigzag layout)")
  chunk = model.head_chunk
  if seq_len is not None and chunk and (seq_len // sequence) % chunk:
    local = seq_len // sequence
    fits = [d for d in _divisors(local) if d >= min(chunk, local) // 4][:4]
    raise ConfigError(f"model.head_chunk={chunk} must divide the {local} tokens each device "
                      f"holds (data.seq_len / mesh.sequence); e.g. {' or '.join(map(str, fits))}")
  if batch_size is not None:
    if batch_size < data * fsdp:
      raise ConfigError(f"global batch {batch_size} < data*fsdp = {data * fsdp}: every data "
                        f"shard needs a row; set data.batch_size>={data * fsdp} or shrink "
                        "mesh.data/mesh.fsdp")
    multiple("data.batch_size", batch_size, data * fsdp, "mesh.data*mesh.fsdp")


def initialize_distributed(coordinator_address: str | None, num_processes: int,
                           process_id: int, *, heartbeat_timeout_seconds: int = 30,
                           shutdown_timeout_seconds: int = 30) -> None:
  """Starts jax.distributed (multi-host); a no-op for one process.

  Must run before any other JAX call. Timeouts are short so that a dead peer ends
  the run in seconds rather than minutes (the survivors abort; checkpoints are what
  is kept).
  """
  if num_processes <= 1:
    return
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                             shutdown_timeout_seconds=shutdown_timeout_seconds)

