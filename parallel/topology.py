"""TPU slices and GPU hosts by name, their memory per chip, and compile-only devices for
them on any host.

libtpu (the `tpu` extra) compiles programs for a named topology with no TPU present:
`devices(name)` gives that slice's compile-only devices, a mesh over them is laid out
as on the real slice, and `jax.jit(...).lower(abstract args).compile()` runs XLA:TPU
and Mosaic for real (docs/tpu.md). libtpu names topologies `GENERATION:AxBxC`; Cloud
names the slices `v5p-128` etc., counting TensorCores on v4 and v5p (two per chip) and
chips on v5e and v6e. Both are accepted here.

The CUDA plugin (jax-cuda12-plugin and its PJRT library, without CUDA's own libraries;
`make .venv/gpu-aot/.installed` puts it in .venv/gpu-aot, used with
PYTHONPATH=.venv/gpu-aot) does the same for a GPU host described by an XLA GPU target
config (`GPU_HOSTS`, e.g. `8xh100`): XLA:GPU and Triton compile with no GPU present.
"""

import math
import os
import re

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

# GPU host name -> (GPUs, XLA's GpuTargetConfig of the GPU as a text proto: what XLA:GPU
# reads from a present device; NVIDIA's published H100 SXM figures).
_H100_SXM = """gpu_device_info {
  threads_per_block_limit: 1024  threads_per_warp: 32  shared_memory_per_block: 49152
  shared_memory_per_core: 233472  threads_per_core_limit: 2048  core_count: 132
  fpus_per_core: 128  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535
  block_dim_limit_z: 65535  memory_bandwidth: 3352320000000  l2_cache_size: 52428800
  clock_rate_ghz: 1.98  device_memory_size: 84978434048  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPU_HOSTS = {"8xh100": (8, _H100_SXM), "1xh100": (1, _H100_SXM)}


def topology_name(name: str) -> str:
  """libtpu's name for `name`, a Cloud slice name (`v5p-128`) or a libtpu one
  (`v5p:4x4x4`); a GPU host's own name. ValueError listing the known names otherwise."""
  if name in GPU_HOSTS:
    return name
  if name in SLICES:
    return SLICES[name]
  generation, _, shape = name.partition(":")
  if generation in HBM_BYTES and shape and all(part.isdigit() and int(part) > 0
                                               for part in shape.split("x")):
    return name
  raise ValueError(f"unknown TPU topology {name!r}; use a slice name ({', '.join(SLICES)}), "
                   f"GENERATION:AxB[xC] with GENERATION one of {', '.join(HBM_BYTES)}, or a "
                   f"GPU host ({', '.join(GPU_HOSTS)})")


def generation(name: str) -> str:
  return topology_name(name).partition(":")[0]


def chips(name: str) -> int:
  if name in GPU_HOSTS:
    return GPU_HOSTS[name][0]
  return math.prod(int(part) for part in topology_name(name).partition(":")[2].split("x"))


def devices_per_chip(name: str) -> int:
  return DEVICES_PER_CHIP.get(generation(name), 1)


def hbm_bytes_per_device(name: str) -> int:
  """The HBM one device of the topology `name` has: its chip's, shared by its cores."""
  if name in GPU_HOSTS:  # the target config's device_memory_size
    return int(re.search(r"device_memory_size: (\d+)", GPU_HOSTS[name][1]).group(1))
  return HBM_BYTES[generation(name)] // devices_per_chip(name)


def devices(name: str, *, quiet: bool = True) -> list:
  """The compile-only devices of topology `name` (a TPU slice in libtpu's order, or a GPU
  host), in any number of processes at once. `quiet`: the plugins' start-up warnings on a
  host without the hardware (libtpu: no TPU_ACCELERATOR_TYPE, no worker hostnames; CUDA:
  cuInit failed), written straight to file descriptor 2, are not shown; errors still
  raise."""
  from jax.experimental import topologies
  name = topology_name(name)
  if name in GPU_HOSTS:
    import importlib.util
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
      raise ImportError("compiling for GPU needs the CUDA plugin on the path: make "
                        ".venv/gpu-aot/.installed, then PYTHONPATH=.venv/gpu-aot python -m ...")
    count, target = GPU_HOSTS[name]
    make = lambda: topologies.get_topology_desc("", "cuda", target_config=target,
                                                topology=f"1x1x{count}").devices
  else:
    # libtpu takes a lockfile (/tmp/libtpu_lockfile) for the process' life, so a second
    # process compiling at the same time would fail ("ABORTED: Internal error when
    # accessing libtpu multi-process lockfile"); compile-only devices touch no chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    make = lambda: topologies.get_topology_desc(name, "tpu").devices
  if not quiet:
    return list(make())
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      return list(make())
  finally:
    os.dup2(saved, 2)
    os.close(saved)
