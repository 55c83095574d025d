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


# CPU features that decide bf16 and int8 matmul speed (torch's and XLA's): with AMX a
# bf16 product runs several times float32's; with avx512_bf16 alone, about as fast.
MATMUL_FEATURES = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f")


def machine() -> dict:
  cpu, flags = platform.processor() or "unknown", set()
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
    cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = set(next(line.split(":", 1)[1] for line in lines if line.startswith("flags")).split())
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu, "cpu_features": [f for f in MATMUL_FEATURES if f in flags],
          "cores": os.cpu_count(), "jax": jax.__version__,
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
