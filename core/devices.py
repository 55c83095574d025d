"""How many virtual CPU devices a CPU-only process makes (`--cpu_devices`), without JAX
(the count must be set before JAX starts its CPU backend)."""

import math

# The default of train.py and the tools: a ring of 8 on one host, as tests/conftest.py.
CPU_DEVICES = 8


def for_mesh(sizes: dict) -> int:
  """The virtual CPU devices a mesh of `sizes` ({axis: size, -1 fills}) needs: the
  product of its axes, or CPU_DEVICES when an axis is -1 (it fills what there is)."""
  values = [int(size) for axis, size in sizes.items() if axis != "allow_split_physical_axes"]
  return math.prod(values) if all(size > 0 for size in values) else CPU_DEVICES
