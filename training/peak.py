"""Peak FLOP/s per device, the denominator of MFU: a table for TPUs and GPUs, a measured
matmul on CPU (the benchmarks measure with the same function)."""

import time

import jax
import jax.numpy as jnp

# Peak dense bf16 FLOP/s per device, by device_kind.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
              "A100": 312e12, "H100": 989e12, "H200": 989e12}


def time_compiled(compiled, args, repeats: int) -> list[float]:
  """Wall times of `repeats` runs of a compiled function after one warm-up run."""
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return times


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


def peak_flops_per_device(mesh, dtype: str) -> float:
  """The dense bf16 peak of PEAK_FLOPS on TPU/GPU; on CPU a matmul measured in the compute
  `dtype` on `mesh`'s devices, which share the host's cores (so divided by their count)."""
  device = mesh.devices.flat[0]
  if device.platform != "cpu":
    for kind, flops in PEAK_FLOPS.items():
      if kind.lower() in device.device_kind.lower():
        return flops
  measured = matmul_peak(mesh, size=2048, repeats=3, dtype=dtype)["peak_flops"]
  return measured / mesh.devices.size
