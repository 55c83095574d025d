"""A checkpoint with int8 weights, which serve.py and the eval tools load without the
original.

  python -m tools.quantize --checkpoint=RUN_DIR --out=NEW_RUN_DIR [--config.serve.dtype=bfloat16]

Every projection weight and the embedding become int8 with one float32 scale per output
channel (model/quantize.py, round to nearest); the norms and biases stay in
--config.serve.dtype (bfloat16 by default), which is also the compute dtype saved with
it. The new run directory has the checkpoint's config.json (model.quantize="int8"),
assets/ and checkpoints/0; nothing appears at --out unless it is complete. Prints the
bytes before and after; the last stdout line is JSON.
"""

import dataclasses
import json
import os
import shutil
import tempfile

from absl import app, flags
from ml_collections import config_flags

import cli
from configs import base

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("checkpoint", None, "Run directory or checkpoint step (float weights).")
  flags.DEFINE_string("out", None, "The new run directory (must not exist).")
  config_flags.DEFINE_config_dict("config", base.get_config(),
                                  "serve.dtype: the precision of what stays float.")
  cli.define_flags()


def _bytes(tree) -> int:
  import jax
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def main(argv):
  del argv
  named = cli.start()
  import jax
  from flax import nnx

  from core.errors import ConfigError
  from model import checkpoint as ckpt_lib, transformer
  from parallel import mesh as mesh_lib
  from serving import loading

  if os.path.exists(FLAGS.out):
    cli.fail(f"--out={FLAGS.out} exists; give a new directory")
  config = FLAGS.config
  with config.unlocked():
    config.serve.quantize = "int8"
  try:
    step_dir, meta = ckpt_lib.load_meta(FLAGS.checkpoint)
    saved = meta["config"]
    if saved["model"].get("quantize"):
      cli.fail(f"--checkpoint={FLAGS.checkpoint} is int8 already")
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    model, saved, _ = loading.load_model(step_dir, config, named, mesh,
                                         saved["model"]["max_seq_len"])
  except FileNotFoundError as error:
    cli.fail(f"--checkpoint: {error}")
  except (ConfigError, ValueError) as error:
    cli.fail(str(error))
  params = nnx.to_pure_dict(nnx.state(model))
  float_bytes = _bytes(transformer.abstract_params(  # the same model unquantized
      dataclasses.replace(model.config, quantize=""), mesh)[1])
  resolved = dict(saved)
  resolved["model"] = dict(saved["model"], quantize="int8", dtype=model.config.dtype,
                           param_dtype=model.config.param_dtype, kv_cache_dtype="")
  out = os.path.abspath(FLAGS.out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2, default=str)
    assets = os.path.join(ckpt_lib.run_dir(step_dir), "assets")
    if os.path.isdir(assets):
      shutil.copytree(assets, os.path.join(tmp, "assets"))
    ckpt_lib.save_params(os.path.join(tmp, "checkpoints", "0"), params,
                         {"step": 0, "config": resolved, "quantized_from": step_dir})
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  int8_bytes = _bytes(params)
  cli.summary([f"wrote {out}: int8 weights, {int8_bytes / 2**20:.1f} MiB of parameters "
               f"({model.config.param_dtype}: {float_bytes / 2**20:.1f} MiB)",
               f"next: python serve.py --checkpoint={out} --input=... --output=..."])
  print(json.dumps({"out": out, "parameter_bytes": int8_bytes,
                    "float_parameter_bytes": float_bytes}))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint", "out"])
  app.run(main, flags_parser=cli.parse_flags)
