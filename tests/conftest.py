"""Test setup: 8 virtual CPU devices, created before JAX starts its backend."""

import atexit
import os
import shutil
import tempfile
import zlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()


def _directory_of_this_run(variable: str, prefix: str) -> None:
  """$variable set to a new temporary directory, removed at exit (unless already set)."""
  if variable not in os.environ:
    os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)


# The serve.py processes tests start share one compilation cache, in a directory of this
# run's (not the user's ~/.cache/ringlm/jax): a later server with the same shapes starts
# from it, and nothing outlives the run.
_directory_of_this_run("RINGLM_COMPILATION_CACHE", "ringlm-test-jax-cache-")
# Likewise the CPU decode kernel (parallel/kernels/cpu_decode.py): built from its source
# once per run, as on a new machine, so that the run checks the build too (~4 s).
_directory_of_this_run("RINGLM_KERNEL_CACHE", "ringlm-test-kernels-")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import cli  # noqa: E402
from parallel import mesh as mesh_lib  # noqa: E402

cli.pin_platforms()  # CPU, even with libtpu installed (the `tpu` extra)
assert jax.device_count() == 8, "tests need 8 virtual devices; was jax started before conftest?"

# The meshes every multi-device test runs on: the ring alone, with data, with tensor
# (docs/design.md, "Testing without accelerators").
MESHES = {
    "seq8": {"sequence": 8},
    "data2-seq4": {"data": 2, "sequence": 4},
    "data2-seq2-tensor2": {"data": 2, "sequence": 2, "tensor": 2},
}


@pytest.fixture(scope="session", params=list(MESHES))
def mesh(request):
  return mesh_lib.make_mesh(MESHES[request.param])


@pytest.fixture(scope="session")
def single_device_mesh():
  return mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])


@pytest.fixture
def rng(request):
  """A fresh generator per test, seeded from the test's name (reproducible, not zeros)."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
