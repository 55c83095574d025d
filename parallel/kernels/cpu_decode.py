"""Decode attention over a KV cache on CPU, as a C++ kernel of our own (XLA FFI).

Dimension letters: core/__init__.py.

XLA:CPU runs the batched products of decode attention (per row and kv head, a [G, D] x
[D, C] and a [G, C] x [C, D]) one after another on one thread at ~7 us each, whatever
their size: on bench/decode.py's 58M model, 32 rows x 4 kv heads x 8 layers of them were
~12 ms of a ~27 ms decode step. `cpu_decode.cc` does each (row, kv head) pair as one work
item on XLA's intra-op thread pool, widens a bfloat16 (or its uint16 bits) or int8 cache
as it reads it, and reads a row's slots only up to the last one its queries may see.

The kernel is compiled from `cpu_decode.cc` on first use with the host's C++ compiler
(`$CXX`, else g++ or c++) for this CPU (-march=native), and kept in
`$RINGLM_KERNEL_CACHE` (default ~/.cache/ringlm/kernels) under a hash of the source, the
flags, jaxlib's version and the CPU. Where no compiler works, `available()` is False and
ring.cache_attention keeps its XLA path (one warning says why).
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

TARGET = "ringlm_cpu_decode_attention"
SOURCE = pathlib.Path(__file__).with_name("cpu_decode.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
         "-fopenmp-simd")
DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.uint16, jnp.int8))
# G * L query rows per kv head sent to the kernel; more (a long prompt chunk) is a real
# matmul, which ring._blockwise leaves to XLA's dot
MAX_QUERY_ROWS = 64

_log = logging.getLogger(__name__)


def _cpu_signature() -> str:
  """The CPU the kernel is built for (-march=native): model name and flags."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor() or platform.machine()
  lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
  return "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _library_path(compiler: str) -> pathlib.Path:
  key = hashlib.sha256("\n".join([
      SOURCE.read_text(), compiler, " ".join(FLAGS), jaxlib.__version__, platform.machine(),
      _cpu_signature()]).encode()).hexdigest()[:16]
  root = pathlib.Path(os.environ.get("RINGLM_KERNEL_CACHE",
                                     pathlib.Path.home() / ".cache" / "ringlm" / "kernels"))
  return root / f"cpu_decode-{key}.so"


def _build(compiler: str, library: pathlib.Path) -> None:
  """Compiles the source into `library` (atomically: processes may race to build it)."""
  library.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
    built = pathlib.Path(scratch) / library.name
    command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    os.replace(built, library)


@functools.cache
def available() -> bool:
  """Whether the kernel is built (or builds now), loaded and registered with XLA."""
  if os.environ.get("RINGLM_CPU_DECODE_KERNEL", "1") == "0":
    return False
  compiler = _compiler()
  if compiler is None:
    _log.warning("no C++ compiler ($CXX, g++, c++): CPU decode attention stays on XLA's "
                 "batched products (slower); install g++ to build parallel/kernels/cpu_decode.cc")
    return False
  library = _library_path(compiler)
  try:
    if not library.exists():
      _log.info("building the CPU decode attention kernel: %s", library)
      _build(compiler, library)
    handler = ctypes.cdll.LoadLibrary(str(library)).RinglmCpuDecodeAttention
  except (OSError, RuntimeError) as error:
    _log.warning("the CPU decode attention kernel did not build or load; staying on XLA's "
                 "batched products (slower): %s", error)
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
  return True


def supports(q_rows: int, cache_dtype) -> bool:
  """Whether the kernel takes `q_rows` (G * L) query rows per kv head over a cache held in
  `cache_dtype` (not float8: ring.cache_attention's XLA path reads that)."""
  return q_rows <= MAX_QUERY_ROWS and jnp.dtype(cache_dtype) in DTYPES


def attend(grouped, q_pos, k, v, kv_pos, k_scale, v_scale, limit, *, scale, window, sinks,
           empty):
  """The sums of one device's attention over its slots, for ring.cache_attention's merge.

  Args (all local to one device, nothing sharded; B rows, K kv heads, G query heads per kv
  head, L queries per row, C slots):
    grouped: [B, K, G, L, D] queries (any float dtype; read as float32).
    q_pos: [B, L] int32 positions of the queries; `empty` (ring.EMPTY) marks a padding
      query, left out of the bound on the slots read (it sees what the others see).
    k: [B, K, D, C] and v: [B, K, C, D] as held: float32, bfloat16, its uint16 bits or int8.
    kv_pos: [B, C] int32 position of each slot (ring.EMPTY: none).
    k_scale, v_scale: [B, K, C] float32 (slot c holds values * scale) or None; int8 needs
      them.
    limit: [B] int32, slots [0, limit[b]) of row b may be read (0: the row gets -inf, 0, 0);
      a row reads them only up to the last slot one of its queries may see.
    scale, window, sinks: as ring.cache_attention's.
  Returns:
    (row maxima [B, K, G, L] float32, -inf where no slot is visible; numerator
    [B, K, G, L, D] float32 and denominator [B, K, G, L, 1] float32, both relative to the
    maxima), as ring._blockwise returns them.
  """
  if not available():
    raise RuntimeError("the CPU decode kernel is not available (see the warning above); "
                       "ring.cache_attention(impl='xla') does not need it")
  batch, kv_heads, groups, length, head_dim = grouped.shape
  rows = groups * length
  q = grouped.astype(jnp.float32).reshape(batch, kv_heads, rows, head_dim)
  scaled = k_scale is not None
  if not scaled:
    k_scale = v_scale = jnp.zeros((1,), jnp.float32)
  out_types = (jax.ShapeDtypeStruct((batch, kv_heads, rows), jnp.float32),
               jax.ShapeDtypeStruct((batch, kv_heads, rows, head_dim), jnp.float32),
               jax.ShapeDtypeStruct((batch, kv_heads, rows), jnp.float32))
  call = jax.ffi.ffi_call(TARGET, out_types, vmap_method="sequential")
  row_max, numerator, denominator = call(
      q, k, v, k_scale.astype(jnp.float32), v_scale.astype(jnp.float32),
      kv_pos.astype(jnp.int32), q_pos.astype(jnp.int32), limit.astype(jnp.int32),
      scale=np.float32(scale), window=int(window), sinks=int(sinks),
      empty=int(empty), scaled=scaled)
  shape = (batch, kv_heads, groups, length)
  return (row_max.reshape(shape), numerator.reshape(*shape, head_dim),
          denominator.reshape(*shape, 1))
