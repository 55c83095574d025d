"""Will this config fit the pod? The training step compiled for a TPU slice, on any host.

  python -m tools.aot --config=configs/llama3_8b.py:v5p-128 [--topology=v5p-128]
                      [--config.FIELD=VALUE ...] [--dump_hlo=DIR]

The step is the one train.py runs (training/steps.make_steps: the same model, remat,
gradient accumulation, optimizer and shardings), compiled by XLA:TPU and Mosaic for
the slice's compile-only devices (libtpu, the `tpu` extra; docs/tpu.md). Prints the
memory per device against the chip's HBM: parameters, optimizer state and batch (from
their shardings), XLA's temporaries and outputs, the FLOPs XLA counts, the compile
time. Exits 0 when the step fits, 1 with the lever to pull when it does not, 2 on a
config that cannot be laid out. The topology defaults to the config's variant name
when that is a slice (`llama3_8b.py:v5p-128`). The last stdout line is JSON:
{"programs": [{"name", "fits", "hbm_bytes", "per_device": {...}, ...}], "topology", "chips"}.
"""

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
  cli.define_flags()


def slice_of(config_argument: str) -> str | None:
  """The slice a config variant names (`configs/llama3_8b.py:v5p-128-1m` -> v5p-128)."""
  from parallel import topology
  variant = config_argument.partition(":")[2]
  return next((name for name in sorted(topology.SLICES, key=len, reverse=True)
               if variant == name or variant.startswith(name + "-")), None)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the most any
  device holds: shards are equal)."""
  import jax
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


def gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def lever(per_device: dict, hbm: int, config) -> str:
  """The first thing to change when a step does not fit, from what holds the memory."""
  state = per_device["parameters"] + per_device["optimizer_state"]
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


def main(argv):
  del argv
  cli.start()
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
  except ImportError:
    cli.fail("compiling for TPU needs libtpu: pip install -e '.[tpu]'")
  try:
    mesh = mesh_lib.make_mesh(config.mesh.to_dict(), devices)
    mesh_lib.validate(ModelConfig.from_dict(config.model.to_dict()), mesh,
                      seq_len=config.data.seq_len, batch_size=config.data.batch_size)
  except ConfigError as error:
    cli.fail(str(error))

  start = time.perf_counter()
  compiled, inputs = compile_train_step(config, mesh)
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  per_device = dict(inputs, temporaries=memory.temp_size_in_bytes,
                    outputs_not_aliased=memory.output_size_in_bytes - memory.alias_size_in_bytes,
                    code=memory.generated_code_size_in_bytes)
  per_device["total"] = (memory.argument_size_in_bytes + per_device["temporaries"]
                         + per_device["outputs_not_aliased"] + per_device["code"])
  hbm = topology.hbm_bytes_per_device(name)
  fits = per_device["total"] <= hbm
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float((cost or {}).get("flops", 0.0))
  if FLAGS.dump_hlo:
    os.makedirs(FLAGS.dump_hlo, exist_ok=True)
    with open(os.path.join(FLAGS.dump_hlo, "train_step.hlo"), "w") as f:
      f.write(compiled.as_text())

  shape = " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items() if size > 1)
  rows = [("parameters", per_device["parameters"]),
          ("optimizer state", per_device["optimizer_state"]),
          ("batch", per_device["batch"]), ("temporaries", per_device["temporaries"]),
          ("outputs (not aliased)", per_device["outputs_not_aliased"]),
          ("code", per_device["code"]), ("total", per_device["total"])]
  lines = [f"train step on {name} ({topology.topology_name(name)}, {len(devices)} devices, "
           f"mesh {shape or 'one device'}), {config.data.batch_size} rows x "
           f"{config.data.seq_len} tokens, compiled in {seconds:.0f} s",
           "| per device | bytes |", "|---|---|"]
  lines += [f"| {label} | {gib(value)} |" for label, value in rows]
  lines.append(f"| HBM | {gib(hbm)} ({100 * per_device['total'] / hbm:.0f}% used) |")
  lines.append(f"XLA's FLOP count per device: {flops:.3g} per step")
  lines.append("fits" if fits else f"does not fit: {lever(per_device, hbm, config)}")
  print("\n".join(lines), flush=True)
  print(json.dumps({"programs": [{"name": "train_step", "fits": fits, "hbm_bytes": hbm,
                                  "per_device": per_device, "flops": flops,
                                  "compile_s": round(seconds, 1)}],
                    "topology": topology.topology_name(name), "chips": topology.chips(name)}),
        flush=True)
  sys.exit(0 if fits else 1)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
