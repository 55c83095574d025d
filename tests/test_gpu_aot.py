"""Compiled by the real GPU compiler on this CPU host: XLA:GPU and Triton for an H100 host
(`parallel/topology.GPU_HOSTS`), with the CUDA plugin on the path of a child process only
(`make .venv/gpu-aot/.installed`; docs/tpu.md says why it is kept apart)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(sys.prefix, "gpu-aot")  # .venv/gpu-aot

RING = """
import cli, jax, jax.numpy as jnp, re
cli.pin_platforms()
from parallel import mesh as mesh_lib, ring, topology
devices = topology.devices("8xh100")
mesh = mesh_lib.make_mesh({"sequence": 8}, devices)
shard = lambda *axes: jax.sharding.NamedSharding(mesh, jax.P(*axes))
q = jax.ShapeDtypeStruct((1, 8192, 8, 128), jnp.bfloat16, sharding=shard(None, "sequence"))
kv = jax.ShapeDtypeStruct((1, 8192, 2, 128), jnp.bfloat16, sharding=shard(None, "sequence"))
positions = jax.ShapeDtypeStruct((1, 8192), jnp.int32, sharding=shard(None, "sequence"))
loss = lambda q, k, v, p: ring.ring_attention(q, k, v, positions=p, mesh=mesh).astype(
    jnp.float32).sum()
hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, positions).compile().as_text()
print(devices[0].platform, devices[0].device_kind, len(devices))
print(sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))))
"""


def _run(*args):
  if not os.path.isdir(os.path.join(PLUGIN, "jax_cuda12_plugin")):
    pytest.fail(f"the CUDA plugin is not in {PLUGIN}: make .venv/gpu-aot/.installed")
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=900, env=dict(os.environ, XLA_FLAGS="",
                                              PYTHONPATH=f"{ROOT}:{PLUGIN}"))


def test_the_ring_compiles_with_triton_kernels_for_an_h100_host():
  """Ring attention, forward and backward, over 8 compile-only H100s: impl=auto follows
  the mesh's devices to the Triton kernels (not an interpreted loop, not XLA's)."""
  result = _run("-c", RING)
  assert result.returncode == 0, result.stderr[-3000:]
  platform, targets = result.stdout.strip().splitlines()[-2:]
  assert platform == "gpu NVIDIA H100 80GB HBM3 8"
  assert "__gpu$xla.gpu.triton" in targets


def test_the_preflight_compiles_the_train_step_for_an_h100_host():
  """tools/aot.py for the 8xh100 variant's mesh (a ring of 8) with a 2-layer model:
  the table, the JSON line with the GPU's memory, the Triton kernels in the HLO."""
  result = _run("-m", "tools.aot", "--config=configs/llama3_8b.py:8xh100",
                "--config.model.n_layers=2", "--config.data.seq_len=8192",
                "--config.model.max_seq_len=8192", "--config.model.head_chunk=1024",
                "--dump_hlo=/dev/shm/ringlm-gpu-aot")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["topology"] == "8xh100" and report["chips"] == 8
  program = report["programs"][0]
  assert program["fits"] and program["hbm_bytes"] == 84978434048
  with open("/dev/shm/ringlm-gpu-aot/train_step.hlo") as f:
    assert "__gpu$xla.gpu.triton" in f.read()
