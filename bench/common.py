"""What every benchmark shares: the machine, timing and the matmul peak (training/peak.py),
memory, output."""

import json
import os
import platform

import jax
import jax.numpy as jnp

import cli
from training.peak import matmul_peak, time_compiled  # noqa: F401  (the benchmarks' too)

cli.pin_platforms()  # CPU, even with libtpu installed (before any benchmark starts JAX)


def machine() -> dict:
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": jax.device_count()}


def planned_bytes(compiled) -> int:
  """Bytes XLA plans for one device of a compiled program: arguments, outputs, temporaries."""
  memory = compiled.memory_analysis()
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
  """Bytes/s of reading a large fp32 array once (a sum over it) on the default device: the
  most a memory-bound step (batch decode) can stream."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  summed = jax.jit(jnp.sum).lower(x).compile()
  return x.nbytes / min(time_compiled(summed, (x,), repeats))


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  print(f"wrote {path}")
