"""What every benchmark shares: the machine, its measured matmul peak, timing, memory, output."""

import json
import os
import platform
import time

import jax
import jax.numpy as jnp


def machine() -> dict:
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": jax.device_count()}


def time_compiled(compiled, args, repeats: int) -> list[float]:
  """Wall times of `repeats` runs after one warm-up run."""
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return times


def planned_bytes(compiled) -> int:
  """Bytes XLA plans for one device of a compiled program: arguments, outputs, temporaries."""
  memory = compiled.memory_analysis()
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def matmul_peak(mesh, size: int = 4096, repeats: int = 5, dtype=jnp.float32) -> dict:
  """FLOP/s of large `dtype` matmuls: one device alone, and every device of `mesh` at once.

  The machine's peak is the larger of the two; on CPU the virtual devices share the cores.
  Products accumulate in float32 as the model's do (model/matmul.py); on CPUs with AMX
  bfloat16 ones then run ~4x faster than float32: measure in the dtype the work computes in.
  """
  matmul = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
  a = jnp.ones((size, size), dtype)
  one = jax.jit(lambda a: matmul(a, a)).lower(a).compile()
  single = 2 * size**3 / min(time_compiled(one, (a,), repeats))  # a peak: the best run
  count = mesh.devices.size
  axes = tuple(mesh.axis_names)
  stacked = jax.device_put(jnp.ones((count * size // 2, size // 2), dtype),
                           jax.NamedSharding(mesh, jax.P(axes)))
  every = jax.jit(jax.shard_map(lambda x: matmul(x, x.T), mesh=mesh, in_specs=jax.P(axes),
                                out_specs=jax.P(axes))).lower(stacked).compile()
  local = size // 2
  parallel = count * 2 * local**3 / min(time_compiled(every, (stacked,), repeats))
  return {"one_device_flops": single, "all_devices_flops": parallel,
          "peak_flops": max(single, parallel)}


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
