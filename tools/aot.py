"""Will this config fit the pod? The training step, or serving's programs, compiled for a
TPU slice, on any host.

  python -m tools.aot --config=configs/llama3_8b.py:v5p-128 [--topology=v5p-128]
                      [--config.FIELD=VALUE ...] [--dump_hlo=DIR]
  python -m tools.aot --config=configs/llama3_8b.py:v5p-128 --serve \
                      [--prompt_tokens=131072] [--rows=1] [--max_tokens=256]

The step is the one train.py runs (training/steps.make_steps: the same model, remat,
gradient accumulation, optimizer and shardings); with --serve, serve.py's prefill and
decode programs (serving/engine.Engine.compile_shapes) on the mesh serve.py would
choose. Compiled by XLA:TPU and Mosaic for the slice's compile-only devices (libtpu,
the `tpu` extra; docs/tpu.md). Prints the memory per device against the chip's HBM:
parameters, optimizer state, batch and KV cache (from their shardings), XLA's
temporaries and outputs, the FLOPs XLA counts, the compile time. Exits 0 when every
program fits, 1 with the lever to pull when one does not, 2 on a config that cannot be
laid out. The topology defaults to the config's variant name
when that is a slice (`llama3_8b.py:v5p-128`). The last stdout line is JSON:
{"programs": [{"name", "fits", "hbm_bytes", "per_device": {...}, ...}], "topology", "chips"}.
"""

import dataclasses
import json
import math
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

import cli

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file("config", None, "ringlm config file[:variant].")
  flags.DEFINE_string("topology", None, "TPU slice (v5p-128) or libtpu topology (v5p:4x4x4); "
                      "default: the config's variant, when it names a slice.")
  flags.DEFINE_string("dump_hlo", None, "Directory to write the compiled programs' HLO to.")
  flags.DEFINE_bool("serve", False, "Compile serve.py's prefill and decode programs instead "
                    "of the training step, on the mesh serve.py would choose.")
  flags.DEFINE_integer("prompt_tokens", None, "--serve: prompt tokens per request "
                       "(default data.seq_len).")
  flags.DEFINE_integer("rows", None, "--serve: requests served together (default "
                       "serve.batch_size).")
  flags.DEFINE_integer("max_tokens", None, "--serve: new tokens per request (default "
                       "serve.max_tokens).")
  cli.define_flags()


def slice_of(config_argument: str) -> str | None:
  """The slice a config variant names (`configs/llama3_8b.py:v5p-128-1m` -> v5p-128)."""
  from parallel import topology
  variant = config_argument.partition(":")[2]
  return next((name for name in sorted([*topology.SLICES, *topology.GPU_HOSTS], key=len,
                                       reverse=True)
               if variant == name or variant.startswith(name + "-")), None)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the most any
  device holds: shards are equal), int4 packed two to a byte as XLA:TPU stores it."""
  import jax

  from parallel import quantized
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * quantized.bits(leaf.dtype) // 8
             for leaf in jax.tree.leaves(tree))


def gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def lever(per_device: dict, hbm: int, config) -> str:
  """The first thing to change when a step does not fit, from what holds the memory."""
  state = per_device["parameters"] + per_device["optimizer_state"]
  if state > 0.4 * hbm and config.mesh.sequence > 1 and not config.train.shard_state_over_sequence:
    return (f"parameters and optimizer state take {gib(state)} per device, the same on every "
            f"device of the ring: --config.train.shard_state_over_sequence=True splits them "
            f"{config.mesh.sequence} ways more")
  if state > 0.4 * hbm:
    return (f"parameters and optimizer state take {gib(state)} per device: shard them over "
            f"more devices (mesh.fsdp={config.mesh.fsdp} -> {2 * config.mesh.fsdp}, taken "
            "from mesh.data or mesh.sequence)")
  if config.model.remat != "full":
    return f"model.remat={config.model.remat!r} -> 'full' (recompute activations)"
  rows = config.data.batch_size // max(config.train.grad_accum, 1)
  if rows > config.mesh.data * config.mesh.fsdp:
    return (f"fewer rows per step: train.grad_accum={config.train.grad_accum} -> "
            f"{2 * config.train.grad_accum} (same batch) or a smaller data.batch_size")
  return (f"fewer tokens per device: a longer ring (mesh.sequence={config.mesh.sequence} -> "
          f"{2 * config.mesh.sequence}) or a shorter data.seq_len")


def vmem_refusal(error: Exception, config, name: str) -> str | None:
  """One message for Mosaic's refusal of attention blocks that do not fit the chip's
  scoped VMEM (None for any other error)."""
  import re
  text = str(error)
  if "CompileTimeScopedVmemOom" not in text and "vmem" not in text.lower():
    return None
  found = re.search(r"limit ([\d.]+M) exceeded scoped vmem limit by ([\d.]+[MK])", text)
  by = f" (Mosaic: {found.group(2)} over the {found.group(1)} limit)" if found else ""
  from parallel.kernels import pallas_tpu
  return (f"attention.block_q={config.attention.block_q} x attention.block_kv="
          f"{config.attention.block_kv} do not fit a {name} core's VMEM{by}; smaller blocks "
          f"do, e.g. the kernel's default {pallas_tpu.BLOCK_Q} x {pallas_tpu.BLOCK_KV} (compiled "
          "on v4, v5e, v5p and v6e): --config.attention.block_q=0 --config.attention.block_kv=0")


def hbm_refusal(error: Exception) -> str | None:
  """XLA:TPU's own refusal of a program whose temporaries exceed the chip's HBM (it checks
  while compiling), as one line; None for any other error."""
  text = " ".join(str(error).split())
  found = text.find("Ran out of memory on HBM")
  return None if found < 0 else text[found:found + 240].split(". ")[0]


def compiled_or_exit(compile_fn, names: list, hint: str, config, name: str, hbm: int):
  """compile_fn() or, when the compiler refuses, one message and the exit status: 1 for
  a program larger than HBM (with its JSON line and `hint`, the lever to pull), 2 for
  attention blocks larger than VMEM; any other error propagates."""
  from parallel import topology
  try:
    return compile_fn()
  except Exception as error:  # noqa: BLE001 (the compiler's refusals, said in one line)
    too_big = hbm_refusal(error)
    if too_big is None:
      message = vmem_refusal(error, config, topology.generation(name))
      if message is None:
        raise
      cli.fail(message)
    print(f"does not fit: XLA: {too_big} Lever: {hint}", flush=True)
    print(json.dumps({"programs": [{"name": program, "fits": False, "hbm_bytes": hbm,
                                    "error": too_big} for program in names],
                      "topology": topology.topology_name(name), "chips": topology.chips(name)}),
          flush=True)
    sys.exit(1)


def serve_lever(per_device: dict, hbm: int, config) -> str:
  """The first thing to change when a serving program does not fit."""
  if per_device["parameters"] > 0.5 * hbm:
    return (f"the weights take {gib(per_device['parameters'])} per device: split them over "
            "mesh.tensor (--config.mesh.tensor=4 ...), or keep them in bfloat16 "
            f"(model.param_dtype={config.model.param_dtype!r})")
  return ("fewer requests together (--rows) or a shorter prompt; or the cache over the ring "
          "(--config.serve.cache_sharding=sequence)")


def compile_train_step(config, mesh):
  """(compiled train step, {what: bytes per device} of its inputs) for `config` on `mesh`."""
  import jax
  import jax.numpy as jnp

  from model.config import AttentionConfig, ModelConfig
  from parallel import sharding
  from training import state as state_lib, steps as steps_lib

  model_config = ModelConfig.from_dict(config.model.to_dict())
  state = state_lib.abstract_state(model_config, config.train, mesh,
                                   AttentionConfig(**config.attention.to_dict()))
  train_step, _ = steps_lib.make_steps(state.graphdef, state.tx, config.train.grad_accum,
                                       state.shardings)
  rows = sharding.named_sharding(mesh, ("batch", "sequence"))
  batch = {name: jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32,
                                      sharding=rows)
           for name in ("inputs", "targets", "positions", "segment_ids")}
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.NamedSharding(mesh, jax.P()))
  counters = {"bad_in_row": scalar, "skipped": scalar}
  compiled = train_step.lower(state.params, state.opt_state, counters, batch).compile()
  return compiled, {"parameters": per_device_bytes(state.params),
                    "optimizer_state": per_device_bytes(state.opt_state),
                    "batch": per_device_bytes(batch)}


def compile_serve_programs(config, named, devices, prompt_tokens: int, rows: int,
                           max_tokens: int):
  """([(name, compiled, {what: bytes per device})], mesh, why) of serve.py's prefill and
  decode programs for `rows` requests of `prompt_tokens` + `max_tokens`, on the mesh
  serve.py would choose (serving/loading.choose_mesh)."""
  from flax import nnx

  from model import transformer
  from model.config import AttentionConfig, ModelConfig
  from parallel import mesh as mesh_lib
  from serving import loading
  from serving.engine import Engine

  mesh, why = loading.choose_mesh(config, named, prompt_tokens + max_tokens, devices)
  # as serving/loading.load_model: no remat without a backward pass, serve.py's precision
  # (serve.dtype, serve.quantize, model.kv_cache_dtype)
  model_fields = config.model.to_dict()
  model_config = dataclasses.replace(
      ModelConfig.from_dict(model_fields), remat="none",
      **loading.serving_precision(config, named, model_fields, mesh))
  mesh_lib.validate(model_config, mesh)
  graphdef, params = transformer.abstract_params(model_config, mesh,
                                                 AttentionConfig(**config.attention.to_dict()))
  engine = Engine(nnx.merge(graphdef, params), mesh, batch_size=rows,
                  min_bucket=config.serve.min_bucket, decode_chunk=config.serve.decode_chunk)
  programs = engine.compile_shapes(rows, prompt_tokens, max_tokens)
  weights = per_device_bytes(params)
  cache = per_device_bytes(programs["prefill"].out_info[2])
  return [("prefill", programs["prefill"], {"parameters": weights}),
          ("decode", programs["decode"], {"parameters": weights, "kv_cache": cache})], mesh, why


def report(name: str, compiled, inputs: dict, seconds: float, hbm: int) -> dict:
  """One program's entry of the JSON line: its memory per device (`inputs`: what its
  arguments hold, by kind; XLA's temporaries, outputs and code), FLOPs, compile time."""
  memory = compiled.memory_analysis()
  per_device = dict(inputs, temporaries=memory.temp_size_in_bytes,
                    outputs_not_aliased=memory.output_size_in_bytes - memory.alias_size_in_bytes,
                    code=memory.generated_code_size_in_bytes)
  per_device["total"] = (memory.argument_size_in_bytes + per_device["temporaries"]
                         + per_device["outputs_not_aliased"] + per_device["code"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"name": name, "fits": per_device["total"] <= hbm, "hbm_bytes": hbm,
          "per_device": per_device, "flops": float((cost or {}).get("flops", 0.0)),
          "compile_s": round(seconds, 1)}


def table(program: dict, title: str) -> str:
  """The program's memory per device as a Markdown table under `title`."""
  per_device, hbm = program["per_device"], program["hbm_bytes"]
  labels = {"parameters": "parameters", "optimizer_state": "optimizer state",
            "batch": "batch", "kv_cache": "KV cache (in the arguments)",
            "temporaries": "temporaries", "outputs_not_aliased": "outputs (not aliased)",
            "code": "code", "total": "total"}
  lines = [title, "| per device | bytes |", "|---|---|"]
  lines += [f"| {label} | {gib(per_device[key])} |" for key, label in labels.items()
            if key in per_device]
  lines.append(f"| HBM | {gib(hbm)} ({100 * per_device['total'] / hbm:.0f}% used) |")
  lines.append(f"XLA's FLOP count per device: {program['flops']:.3g} per call")
  return "\n".join(lines)


def mesh_text(mesh) -> str:
  return " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items() if size > 1) \
      or "one device"


def main(argv):
  del argv
  named = cli.start()
  from core.errors import ConfigError
  from model.config import ModelConfig
  from parallel import mesh as mesh_lib, topology

  config = FLAGS.config
  name = FLAGS.topology or slice_of(config_flags.get_config_filename(FLAGS["config"]))
  if name is None:
    cli.fail("--topology: the config's variant names no TPU slice; give one, e.g. "
             "--topology=v5p-128 (docs/tpu.md lists them)")
  try:
    devices = topology.devices(name, quiet=not cli.verbose())
  except ValueError as error:
    cli.fail(f"--topology: {error}")
  except ImportError as error:
    cli.fail(str(error) if topology.topology_name(name) in topology.GPU_HOSTS
             else "compiling for TPU needs libtpu: pip install -e '.[tpu]'")
  hbm = topology.hbm_bytes_per_device(name)
  where = f"{name} ({topology.topology_name(name)}, {len(devices)} devices"
  programs, texts, executables = [], [], []
  if FLAGS.serve:
    prompt = FLAGS.prompt_tokens or config.data.seq_len
    rows = FLAGS.rows or config.serve.batch_size
    max_tokens = FLAGS.max_tokens or config.serve.max_tokens
    start = time.perf_counter()
    try:
      compiled, mesh, why = compiled_or_exit(
          lambda: compile_serve_programs(config, named, devices, prompt, rows, max_tokens),
          ["prefill", "decode"], serve_lever({"parameters": 0}, hbm, config), config, name,
          hbm)
    except (ConfigError, ValueError) as error:
      cli.fail(str(error))
    seconds = (time.perf_counter() - start) / 2
    for program, executable, inputs in compiled:
      executables.append(executable)
      programs.append(report(program, executable, inputs, seconds, hbm))
      texts.append(table(programs[-1], (
          f"serve {program} on {where}, mesh {mesh_text(mesh)}: {why}), {rows} requests x "
          f"{prompt} prompt tokens + {max_tokens} new ones")))
  else:
    try:
      mesh = mesh_lib.make_mesh(config.mesh.to_dict(), devices)
      mesh_lib.validate(ModelConfig.from_dict(config.model.to_dict()), mesh,
                        seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                        state_over_sequence=config.train.shard_state_over_sequence)
    except ConfigError as error:
      cli.fail(str(error))
    start = time.perf_counter()
    executable, inputs = compiled_or_exit(
        lambda: compile_train_step(config, mesh), ["train_step"],
        lever({"parameters": 0, "optimizer_state": 0}, hbm, config), config, name, hbm)
    executables.append(executable)
    programs.append(report("train_step", executable, inputs, time.perf_counter() - start, hbm))
    texts.append(table(programs[-1], (
        f"train step on {where}, mesh {mesh_text(mesh)}), {config.data.batch_size} rows x "
        f"{config.data.seq_len} tokens, compiled in {programs[-1]['compile_s']:.0f} s")))
  if FLAGS.dump_hlo:
    os.makedirs(FLAGS.dump_hlo, exist_ok=True)
    for program, executable in zip(programs, executables):
      with open(os.path.join(FLAGS.dump_hlo, f"{program['name']}.hlo"), "w") as f:
        f.write(executable.as_text())

  fits = all(program["fits"] for program in programs)
  for program, text in zip(programs, texts):
    verdict = "fits" if program["fits"] else (
        "does not fit: " + (lever(program["per_device"], hbm, config) if program["name"] ==
                            "train_step" else serve_lever(program["per_device"], hbm, config)))
    print(f"{text}\n{verdict}\n", flush=True)
  print(json.dumps({"programs": programs, "topology": topology.topology_name(name),
                    "chips": topology.chips(name)}), flush=True)
  sys.exit(0 if fits else 1)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
