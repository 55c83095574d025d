"""TPU slices by name, their chips' HBM, and compile-only devices for them on any host.

libtpu (the `tpu` extra) compiles programs for a named topology with no TPU present:
`devices(name)` gives that slice's compile-only devices, a mesh over them is laid out
as on the real slice, and `jax.jit(...).lower(abstract args).compile()` runs XLA:TPU
and Mosaic for real (docs/tpu.md). libtpu names topologies `GENERATION:AxBxC`; Cloud
names the slices `v5p-128` etc., counting TensorCores on v4 and v5p (two per chip) and
chips on v5e and v6e. Both are accepted here.
"""

import math
import os

# Cloud slice name -> libtpu topology (chips along each physical axis).
SLICES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4",
    "v4-128": "v4:4x4x4", "v4-256": "v4:4x4x8",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4",
    "v5e-32": "v5e:4x8", "v5e-64": "v5e:8x8", "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4",
    "v6e-32": "v6e:4x8", "v6e-64": "v6e:8x8", "v6e-128": "v6e:8x16", "v6e-256": "v6e:16x16",
}
# HBM per chip, bytes (Cloud TPU documentation: v4 32 GiB, v5e 16, v5p 95, v6e 32).
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}
# libtpu's compile-only v4 topologies have a device per TensorCore (two per chip, sharing
# its HBM); the other generations one per chip.
DEVICES_PER_CHIP = {"v4": 2}


def topology_name(name: str) -> str:
  """libtpu's name for `name`, a Cloud slice name (`v5p-128`) or a libtpu one
  (`v5p:4x4x4`). ValueError listing the known names otherwise."""
  if name in SLICES:
    return SLICES[name]
  generation, _, shape = name.partition(":")
  if generation in HBM_BYTES and shape and all(part.isdigit() and int(part) > 0
                                               for part in shape.split("x")):
    return name
  raise ValueError(f"unknown TPU topology {name!r}; use a slice name ({', '.join(SLICES)}) or "
                   f"GENERATION:AxB[xC] with GENERATION one of {', '.join(HBM_BYTES)}")


def generation(name: str) -> str:
  return topology_name(name).partition(":")[0]


def chips(name: str) -> int:
  return math.prod(int(part) for part in topology_name(name).partition(":")[2].split("x"))


def devices_per_chip(name: str) -> int:
  return DEVICES_PER_CHIP.get(generation(name), 1)


def hbm_bytes_per_device(name: str) -> int:
  """The HBM one device of the topology `name` has: its chip's, shared by its cores."""
  return HBM_BYTES[generation(name)] // devices_per_chip(name)


def devices(name: str, *, quiet: bool = True) -> list:
  """The compile-only devices of topology `name`, in libtpu's order (any number of
  processes at once). `quiet`: libtpu's start-up warnings on a host without a TPU (no
  TPU_ACCELERATOR_TYPE, no worker hostnames), written straight to file descriptor 2, are
  not shown; errors still raise."""
  from jax.experimental import topologies
  name = topology_name(name)
  # libtpu takes a lockfile (/tmp/libtpu_lockfile) for the process' life, so a second
  # process compiling at the same time would fail ("ABORTED: Internal error when accessing
  # libtpu multi-process lockfile"); compile-only devices touch no chip, so allow it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not quiet:
    return list(topologies.get_topology_desc(name, "tpu").devices)
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      return list(topologies.get_topology_desc(name, "tpu").devices)
  finally:
    os.dup2(saved, 2)
    os.close(saved)
