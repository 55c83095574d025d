"""Test setup: 8 virtual CPU devices, created before JAX starts its backend."""

import os
import zlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
# The serve.py processes tests start share one compilation cache, in a directory of this
# run's (not the user's ~/.cache/ringlm/jax): a later server with the same shapes starts
# from it, and nothing outlives the run.
if "RINGLM_COMPILATION_CACHE" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["RINGLM_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="ringlm-test-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["RINGLM_COMPILATION_CACHE"], ignore_errors=True)

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
