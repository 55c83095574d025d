"""Compiled by the real TPU compiler on this CPU host (libtpu, the `tpu` extra): the
Pallas kernels through Mosaic for four generations, the ring's schedule, the model's
kernel choice, and meshes laid on the torus. See docs/tpu.md."""

import importlib
import json
import re
import subprocess

import jax
import jax.numpy as jnp
import pytest

from core.errors import ConfigError
from parallel import mesh as mesh_lib, ring, topology
from parallel.kernels import pallas_tpu

# (head dim, dtype, query heads per kv head): every generation compiles each.
KERNEL_CASES = [(64, jnp.float32, 1), (128, jnp.bfloat16, 4), (256, jnp.bfloat16, 8),
                (128, jnp.float32, 8)]
GENERATIONS = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def _abstract(sharding, *shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"d{c[0]}-{c[1].dtype.name}-gqa{c[2]}")
@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_kernels_compile_with_mosaic(generation, case):
  """Forward, dK/dV and dQ at the default blocks (512), 1000 tokens (not a multiple of the
  block), two kv heads: Mosaic accepts them (VMEM, layouts) and the program holds the
  compiled kernels, not an interpreted loop."""
  head_dim, dtype, group = case
  device = topology.devices(GENERATIONS[generation])[0]
  array = lambda *shape, dtype=dtype: _abstract(jax.sharding.SingleDeviceSharding(device),
                                                *shape, dtype=dtype)
  q, kv = array(1, 1000, 2 * group, head_dim), array(1, 1000, 2, head_dim)
  tokens = [array(1, 1000, dtype=jnp.int32)] * 4
  opts = dict(causal=True, scale=head_dim ** -0.5, interpret=False)
  forward = jax.jit(lambda q, k, v, *t: pallas_tpu.block_attention(q, k, v, *t, **opts))
  hlo = forward.lower(q, kv, kv, *tokens).compile().as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') == 1
  backward = jax.jit(lambda q, k, v, *rest: pallas_tpu.block_attention_bwd(q, k, v, *rest, **opts))
  lse = array(1, 1000, 2 * group, dtype=jnp.float32)
  hlo = backward.lower(q, kv, kv, *tokens, q, lse, q).compile().as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') == 2


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
def test_windowed_kernels_compile_with_mosaic(generation):
  """The sliding-window mask (with sinks) in the three Mosaic kernels: 1000 tokens,
  window 300, 4 sinks, bf16 GQA 4:1."""
  device = topology.devices(GENERATIONS[generation])[0]
  array = lambda *shape, dtype=jnp.bfloat16: _abstract(
      jax.sharding.SingleDeviceSharding(device), *shape, dtype=dtype)
  q, kv = array(1, 1000, 8, 128), array(1, 1000, 2, 128)
  tokens = [array(1, 1000, dtype=jnp.int32)] * 4
  opts = dict(causal=True, scale=128 ** -0.5, window=300, sinks=4, interpret=False)
  forward = jax.jit(lambda q, k, v, *t: pallas_tpu.block_attention(q, k, v, *t, **opts))
  assert forward.lower(q, kv, kv, *tokens).compile().as_text().count("tpu_custom_call") >= 1
  backward = jax.jit(lambda q, k, v, *rest: pallas_tpu.block_attention_bwd(q, k, v, *rest, **opts))
  lse = array(1, 1000, 8, dtype=jnp.float32)
  hlo = backward.lower(q, kv, kv, *tokens, q, lse, q).compile().as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') == 2


def test_skip_tables_beyond_smem_are_split():
  """256K tokens against 256K keys in one call (a 16M-token prompt's block on each of 64
  chips): unsplit, the two [512, 512] int32 skip tables need 2 MiB of v5p's 1 MiB SMEM and
  Mosaic refuses them; split at TABLE_ENTRIES they compile, 4 forward calls and 4 + 4
  backward calls."""
  device = topology.devices(GENERATIONS["v5p"])[0]
  array = lambda *shape, dtype=jnp.bfloat16: _abstract(
      jax.sharding.SingleDeviceSharding(device), *shape, dtype=dtype)
  length = 512 * pallas_tpu.BLOCK_Q
  q = array(1, length, 1, 128)
  tokens = [array(1, length, dtype=jnp.int32)] * 4
  lse = array(1, length, 1, dtype=jnp.float32)

  def compiled(table_entries):
    opts = dict(causal=True, scale=128 ** -0.5, interpret=False, table_entries=table_entries)
    forward = jax.jit(lambda q, k, v, *t: pallas_tpu.block_attention(q, k, v, *t, **opts))
    backward = jax.jit(lambda *args: pallas_tpu.block_attention_bwd(*args, **opts))
    return (forward.lower(q, q, q, *tokens).compile().as_text(),
            backward.lower(q, q, q, *tokens, q, lse, q).compile().as_text())

  with pytest.raises(Exception, match="out of memory in memory space smem"):
    compiled(512 * 512)
  forward, backward = compiled(pallas_tpu.TABLE_ENTRIES)
  assert forward.count('custom_call_target="tpu_custom_call"') == 4
  assert backward.count('custom_call_target="tpu_custom_call"') == 8


def _ring_program(mesh, length=8192, heads=8, kv_heads=2, head_dim=128, impl="auto",
                  window=0):
  """The compiled forward and backward of ring attention over `mesh`'s sequence axis."""
  batch_axes = mesh_lib.AXES[:2]
  spec = jax.sharding.NamedSharding
  q = _abstract(spec(mesh, jax.P(batch_axes, "sequence", "tensor", None)), 1, length, heads,
                head_dim, dtype=jnp.bfloat16)
  kv = _abstract(spec(mesh, jax.P(batch_axes, "sequence", "tensor", None)), 1, length,
                 kv_heads, head_dim, dtype=jnp.bfloat16)
  positions = _abstract(spec(mesh, jax.P(batch_axes, "sequence")), 1, length, dtype=jnp.int32)

  def loss(q, k, v, positions):
    out = ring.ring_attention(q, k, v, positions=positions, mesh=mesh, impl=impl,
                              window=window)
    return out.astype(jnp.float32).sum()

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, positions).compile()


def test_a_tpu_mesh_gets_mosaic_kernels_from_a_cpu_host():
  """impl=auto follows the mesh's devices, not the process' default backend (CPU here)."""
  assert jax.default_backend() == "cpu"
  mesh = mesh_lib.make_mesh({"sequence": 8}, topology.devices("v5e:2x4"))
  hlo = _ring_program(mesh, length=4096).as_text()
  assert 'custom_call_target="tpu_custom_call"' in hlo  # forward, dK/dV, dQ kernels


def _instructions(hlo: str, computation: str) -> list[str]:
  """The instruction lines of one computation of a scheduled HLO module, in order."""
  lines = hlo.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(computation))
  body = []
  for line in lines[start + 1:]:
    if line.startswith("}"):
      break
    body.append(line.strip())
  return body


def test_the_ring_overlaps_transfers_with_the_kernels():
  """In the scheduled TPU program (v5e:2x4, a ring of 8), every transfer of the ring is
  asynchronous and a Mosaic kernel runs between its start and its done: in the forward
  loop the next K/V block travels during the attention kernel, in the backward loop the
  K/V block and the dK/dV accumulators travel during the dK/dV and dQ kernels."""
  mesh = mesh_lib.make_mesh({"sequence": 8}, topology.devices("v5e:2x4"))
  hlo = _ring_program(mesh).as_text()
  assert not re.search(r"= \S+ collective-permute\(", hlo), "a synchronous collective-permute"
  loops = re.findall(r"body=(%[\w.\-]+)", hlo)
  checked = 0
  for body in dict.fromkeys(loops):
    instructions = _instructions(hlo, body)
    starts = {re.match(r"(%[\w.\-]+) =", line).group(1): index
              for index, line in enumerate(instructions) if "collective-permute-start(" in line}
    if not starts:
      continue
    kernels = [index for index, line in enumerate(instructions) if "tpu_custom_call" in line]
    for name, start in starts.items():
      done = next(index for index, line in enumerate(instructions)
                  if "collective-permute-done(" in line and f"({name})" in line)
      assert any(start < kernel < done for kernel in kernels), (body, name)
      checked += 1
  assert checked >= 3, f"expected the forward's and the backward's transfers, checked {checked}"


def test_the_shortened_ring_compiles_for_tpu():
  """A windowed ring (a traced number of steps) compiles for v5e:2x4 with Mosaic kernels
  and asynchronous transfers only."""
  mesh = mesh_lib.make_mesh({"sequence": 8}, topology.devices("v5e:2x4"))
  hlo = _ring_program(mesh, window=1024).as_text()
  assert not re.search(r"= \S+ collective-permute\(", hlo), "a synchronous collective-permute"
  assert "collective-permute-start" in hlo and "tpu_custom_call" in hlo
  # the ranges that decide how far blocks travel (XLA:TPU makes the all-gather an all-reduce)
  assert "all-gather" in hlo or "all-reduce" in hlo


def test_meshes_are_laid_on_the_torus():
  """v5p-128 (4x4x4 chips): fsdp 4 x sequence 8 x tensor 2 would split a physical axis:
  refused with shapes that fit, accepted when asked for; whole-axis shapes lay out."""
  devices = topology.devices("v5p-128")
  assert len(devices) == 64
  with pytest.raises(ConfigError) as error:
    mesh_lib.make_mesh({"fsdp": 4, "sequence": 8, "tensor": 2}, devices)
  message = str(error.value)
  assert "4x4x4 chips without splitting" in message and "allow_split_physical_axes" in message
  suggested = re.findall(r"mesh\.data=(\d+) mesh\.fsdp=(\d+) mesh\.sequence=(\d+) "
                         r"mesh\.tensor=(\d+)", message)
  assert suggested
  for sizes in suggested:  # every suggestion lays out
    mesh_lib.make_mesh(dict(zip(mesh_lib.AXES, map(int, sizes))), devices)
  split = mesh_lib.make_mesh({"fsdp": 4, "sequence": 8, "tensor": 2,
                              "allow_split_physical_axes": True}, devices)
  assert dict(split.shape) == {"data": 1, "fsdp": 4, "sequence": 8, "tensor": 2}
  whole = mesh_lib.make_mesh({"fsdp": 4, "sequence": 16}, devices)
  assert sorted({d.id for d in whole.devices.flat}) == sorted(d.id for d in devices)


@pytest.mark.parametrize("name", list(topology.SLICES))
def test_every_slice_name_is_a_libtpu_topology(name):
  assert len(topology.devices(name)) == topology.chips(name) * topology.devices_per_chip(name)


def test_an_unknown_topology_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown TPU topology 'v5p-100'.*v5p-128"):
    topology.topology_name("v5p-100")
  assert topology.hbm_bytes_per_device("v5p-128") == 95 << 30
  assert topology.hbm_bytes_per_device("v4-8") == 16 << 30  # two cores share a chip's 32 GiB


@pytest.mark.parametrize("name", ["llama2_7b", "llama3_8b"])
def test_the_real_size_tpu_configs_lay_out_on_their_slices(name):
  module = importlib.import_module(f"configs.{name}")
  for variant in module.MESHES:
    slice_name = next((s for s in topology.SLICES if variant == s or
                       variant.startswith(s + "-")), None)
    if slice_name is None:
      continue  # a GPU variant (8xh100)
    mesh = mesh_lib.make_mesh(module.get_config(variant).mesh.to_dict(),
                              topology.devices(slice_name))
    assert mesh.devices.size == topology.chips(slice_name)


def _aot(*args):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, "-m", "tools.aot", *args], cwd=root,
                        capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=root))


def test_the_preflight_compiles_the_train_step_for_a_slice(tmp_path):
  """tools/aot.py on the tiny model for v5e-8 (data 2 x ring 4): the table, the JSON line,
  the HLO with Mosaic kernels; libtpu's start-up warnings out of sight."""
  import json
  result = _aot("--config=configs/tiny.py", "--topology=v5e-8", "--config.mesh.data=2",
                "--config.mesh.sequence=4", "--config.model.n_layers=1",
                "--config.data.seq_len=256", f"--dump_hlo={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "TPU_ACCELERATOR_TYPE" not in result.stderr and "Traceback" not in result.stderr
  assert "| optimizer state |" in result.stdout and "fits" in result.stdout
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["topology"] == "v5e:2x4" and report["chips"] == 8
  program = report["programs"][0]
  assert program["fits"] and program["hbm_bytes"] == 16 << 30
  per_device = program["per_device"]
  # AdamW's two moments, sharded like the parameters (fp32): twice their bytes, plus counts.
  assert 2 * per_device["parameters"] <= per_device["optimizer_state"] \
      < 2 * per_device["parameters"] + 1024
  assert 'custom_call_target="tpu_custom_call"' in (tmp_path / "train_step.hlo").read_text()


def test_the_preflight_refuses_what_cannot_be_laid_out():
  result = _aot("--config=configs/tiny.py", "--topology=v5p-100")
  assert result.returncode == 2 and "unknown TPU topology 'v5p-100'" in result.stderr
  result = _aot("--config=configs/llama3_8b.py:v5p-128", "--config.mesh.sequence=8",
                "--config.mesh.tensor=2")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert "without splitting a physical axis" in result.stderr


def _serve_preflight(tmp_path, *flags):
  import json
  # remat as the real-size configs train (it broke the serving programs' trace)
  result = _aot("--config=configs/tiny.py", "--topology=v5e-8", "--serve",
                "--config.model.n_layers=2", "--config.serve.long_context=1024",
                "--config.model.remat=full",
                "--prompt_tokens=2000", "--rows=4", "--max_tokens=32",
                f"--dump_hlo={tmp_path}", *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  return result, json.loads(result.stdout.strip().splitlines()[-1])


def test_the_preflight_compiles_the_serving_programs(tmp_path):
  """tools/aot.py --serve: serve.py's prefill and decode for 4 requests of 2000 prompt
  tokens (a long prompt: the ring over the slice, as serve.py would choose), each a
  table and an entry of the JSON line; the decode's KV cache counted; a training config
  with remat compiles too."""
  result, report = _serve_preflight(tmp_path)
  assert "mesh sequence 8" in result.stdout and "serve decode" in result.stdout
  assert [p["name"] for p in report["programs"]] == ["prefill", "decode"]
  prefill, decode = report["programs"]
  assert prefill["fits"] and decode["fits"]
  # 4 rows x (2048 prompt slots + 32 of room) x 2 layers x K and V x 2 kv heads x 32 dims
  # x 2 bytes (bf16, serve.dtype's default on TPU), over a ring of 8.
  assert decode["per_device"]["kv_cache"] >= 4 * 2080 * 2 * 2 * 2 * 32 * 2 // 8
  for name in ("prefill", "decode"):
    assert 'custom_call_target="tpu_custom_call"' in (tmp_path / f"{name}.hlo").read_text() \
        or name == "decode"


@pytest.mark.parametrize("as_matrices", [True, False])
def test_the_decode_of_two_rows_does_not_copy_the_qkv_weights(as_matrices, monkeypatch):
  """The batch engine's decode of 2 rows on one v5e chip, bf16, 2 layers of dim 2048:
  with the q/k/v weights held as [H·D, M] (the engines' transformer.heads_as_matrices)
  XLA:TPU reads them in place; held as [M, H, D], it copied each into another tiling
  before the decode loop (Llama-2-7B: 3 GiB per chip)."""
  import dataclasses
  from flax import nnx
  from model import transformer
  from model.config import AttentionConfig, ModelConfig
  from serving.engine import Engine
  if not as_matrices:
    monkeypatch.setattr(transformer, "heads_as_matrices", lambda state: state)
  mesh = mesh_lib.make_mesh({"data": 1}, topology.devices("v5e:2x2")[:1])
  config = dataclasses.replace(ModelConfig(), dim=2048, n_layers=2, n_heads=16, n_kv_heads=16,
                               head_dim=128, mlp_dim=5632, vocab_size=32000, max_seq_len=4096,
                               dtype="bfloat16", param_dtype="bfloat16", remat="none")
  graphdef, params = transformer.abstract_params(config, mesh, AttentionConfig())
  engine = Engine(nnx.merge(graphdef, params), mesh, batch_size=2)
  decode = engine.compile_shapes(2, 1024, 64)["decode"]
  copies = [line for line in decode.as_text().splitlines()
            if " copy(" in line and re.search(r"= bf16\[(2048,16,128|2048,2048)\]", line)]
  assert len(copies) == (0 if as_matrices else 6), copies  # 2 layers x q, k, v


@pytest.mark.slow
@pytest.mark.parametrize("weights,cache,parameter_ratio", [("int8", "int8", 0.6),
                                                           ("int4", "float8_e4m3fn", 0.35)])
def test_quantized_weights_and_cache_compile_for_tpu(weights, cache, parameter_ratio, tmp_path):
  """The same programs with int8 weights and an int8 KV cache, or int4 weights (groups
  of 128) and a float8 cache: XLA:TPU compiles them, and the pre-flight's table shows
  the parameters shrink (int4 packed two to a byte) and the cache too ((32 + 4) bytes a
  head and token against bf16's 64)."""
  _, bf16 = _serve_preflight(tmp_path / "bf16")
  _, small = _serve_preflight(tmp_path / weights, f"--config.serve.quantize={weights}",
                              f"--config.model.kv_cache_dtype={cache}")
  for before, after in zip(bf16["programs"], small["programs"]):
    assert after["fits"]
    ratio = after["per_device"]["parameters"] / before["per_device"]["parameters"]
    assert ratio < parameter_ratio, ratio
    assert after["per_device"]["total"] < before["per_device"]["total"]  # XLA's own count
  kv_bytes = lambda report: report["programs"][1]["per_device"]["kv_cache"]
  assert abs(kv_bytes(small) / kv_bytes(bf16) - 36 / 64) < 0.02


@pytest.mark.slow  # ~35 s of Mosaic compiles
def test_blocks_too_large_for_vmem_are_one_message():
  """Mosaic refuses 4096 x 4096 blocks on v5e (16 MiB of scoped VMEM): the pre-flight
  says which fields and what fits, without a traceback."""
  result = _aot("--config=configs/tiny.py", "--topology=v5e-8", "--config.mesh.data=2",
                "--config.mesh.sequence=4", "--config.model.n_layers=1",
                "--config.data.seq_len=8192", "--config.model.dim=1024",
                "--config.attention.block_q=4096", "--config.attention.block_kv=4096")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert "attention.block_q=4096 x attention.block_kv=4096 do not fit a v5e core's VMEM" \
      in result.stderr and "over the 16.00M limit" in result.stderr


def test_a_step_larger_than_hbm_is_does_not_fit_not_a_traceback():
  """XLA:TPU refuses, while compiling, a step whose temporaries exceed HBM (64 rows of 64K
  tokens of the tiny model on v5e-8): exit 1, "does not fit" with XLA's figures and a
  lever, and the JSON line says fits: false."""
  import json
  result = _aot("--config=configs/tiny.py", "--topology=v5e-8", "--config.mesh.data=2",
                "--config.mesh.sequence=4", "--config.model.n_layers=1",
                "--config.data.seq_len=65536", "--config.data.batch_size=64")
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert "does not fit: XLA: Ran out of memory on HBM" in result.stdout
  assert "Lever: " in result.stdout
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["programs"][0]["fits"] is False


def test_the_memory_table_lays_cells_and_resumes_its_file(monkeypatch):
  from tools import memory_table
  # 32K tokens at <= 16K per device: the shortest ring of whole torus axes is 4
  assert memory_table.training_mesh("v5p-128", 32768, 16384) == {
      "sequence": 4, "fsdp": 16, "rows": 16}
  assert memory_table.training_mesh("v5p-128", 1 << 20, 16384)["sequence"] == 64
  runs = []

  def compile_once(args, **kwargs):
    runs.append(args)
    return subprocess.CompletedProcess(args, 0, stdout='{"programs": []}\n', stderr="")
  monkeypatch.setattr(memory_table.subprocess, "run", compile_once)
  monkeypatch.setattr(memory_table, "COMPILED", {})
  first = memory_table.run_aot("llama3_8b", "v5p-128", {"data.seq_len": 32768})
  assert len(runs) == 1 and first["programs"] == []
  # a cell as main() loads it from --output: the same arguments are not compiled again
  memory_table.COMPILED[json.dumps(first["argv"])] = dict(first, kind="train", mesh={})
  again = memory_table.run_aot("llama3_8b", "v5p-128", {"data.seq_len": 32768})
  assert len(runs) == 1 and again == first
  memory_table.run_aot("llama3_8b", "v5p-128", {"data.seq_len": 65536})
  assert len(runs) == 2


@pytest.mark.parametrize("limit_bytes", [5_000, 40_000, 130_000, 10**9])
def test_the_longest_that_fits_is_a_compiled_pair_of_cells(limit_bytes):
  from tools import memory_table
  compiled = []

  def cell_at(size):  # bytes = 1000 + 10 per unit, and 20% more past 4096 units
    if size not in compiled:
      compiled.append(size)
    total = 1000 + 10 * size + (size > 4096) * size // 5
    return {"programs": [{"fits": total <= limit_bytes, "hbm_bytes": limit_bytes,
                          "per_device": {"total": total}}]}
  found = memory_table.largest_fitting(cell_at, 32, 1 << 20)
  searched = list(compiled)
  assert len(searched) <= 6  # not every doubling
  sizes = [32 * 2**k for k in range(16) if 32 * 2**k <= 1 << 20]
  expected = max((n for n in sizes if cell_at(n)["programs"][0]["fits"]), default=None)
  assert found == expected
  if found is not None and 2 * found <= 1 << 20:
    assert found in searched and 2 * found in searched  # the pair is compiled
