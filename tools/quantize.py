"""A checkpoint with quantized weights, which serve.py and the eval tools load without the
original: int8 or int4, rounded to nearest or calibrated by GPTQ or AWQ.

  python -m tools.quantize --checkpoint=RUN_DIR --out=NEW_RUN_DIR
      [--method=rtn|gptq|awq] [--calibration_tokens=512]
      [--config.serve.quantize=int8|int4] [--config.model.quantize_group=128]
      [--config.serve.dtype=bfloat16]

Every projection weight and the embedding become int8 with one float32 scale per output
channel, or int4 with one per `model.quantize_group` input channels (model/quantize.py).
--method chooses the values: rtn rounds each weight to nearest; gptq and awq
(model/calibration.py) fit them to what each projection is fed on
--calibration_tokens tokens of the checkpoint's own training data (the documents
tools/eval_ppl does not hold out), in rows of up to 512. The norms and biases stay in
--config.serve.dtype (bfloat16 by default), which is also the compute dtype saved with
it. The new run directory has the checkpoint's config.json (model.quantize set),
assets/ and checkpoints/0; nothing appears at --out unless it is complete. Prints the
bytes before and after; the last stdout line is JSON.
"""

import dataclasses
import json
import os
import shutil
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

import cli
from configs import base

FLAGS = flags.FLAGS
CALIBRATION_ROW = 512  # tokens per calibration row (fewer when the model's context is shorter)


def define_flags():
  from model import calibration
  flags.DEFINE_string("checkpoint", None, "Run directory or checkpoint step (float weights).")
  flags.DEFINE_string("out", None, "The new run directory (must not exist).")
  flags.DEFINE_enum("method", "rtn", calibration.METHODS,
                    "rtn: round to nearest; gptq, awq: calibrated on the run's data.")
  flags.DEFINE_integer("calibration_tokens", 512, "Tokens of training data gptq/awq see.")
  config_flags.DEFINE_config_dict(
      "config", base.get_config(),
      "serve.quantize: int8 (default here) or int4; model.quantize_group: int4's group; "
      "serve.dtype: the precision of what stays float.")
  cli.define_flags()


def parameter_bytes(tree) -> int:
  """Bytes of the arrays of `tree` at their dtypes' widths (int4: half a byte)."""
  import jax

  from parallel import quantized
  return sum(leaf.size * quantized.bits(leaf.dtype) // 8 for leaf in jax.tree.leaves(tree))


def calibration_rows(documents, tokenizer, tokens: int, row: int):
  """[rows, row] int32: the documents tokenized (each ended by EOS) and concatenated, the
  first `tokens` of them rounded up to whole rows. Fewer rows when the documents run out
  (at least one is required)."""
  import numpy as np
  eos = tokenizer.eos_id()
  ids, needed = [], -(-tokens // row) * row
  for text in documents:
    ids += tokenizer.encode(text) + ([eos] if eos >= 0 else [])
    if len(ids) >= needed:
      break
  rows = min(len(ids), needed) // row
  if not rows:
    cli.fail(f"the training documents hold {len(ids)} tokens, fewer than one calibration "
             f"row of {row}; use --config.data.files with more text")
  return np.asarray(ids[:rows * row], np.int32).reshape(rows, row)


def main(argv):
  del argv
  named = cli.start()
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from core.errors import ConfigError
  from data import pipeline
  from model import calibration, checkpoint as ckpt_lib
  from parallel import mesh as mesh_lib
  from serving import loading

  if os.path.exists(FLAGS.out):
    cli.fail(f"--out={FLAGS.out} exists; give a new directory")
  config = FLAGS.config
  quantize = config.serve.quantize or "int8"
  dtype = config.serve.dtype or "bfloat16"
  with config.unlocked():  # read as float32 floats; quantized and cast below
    config.serve.quantize, config.serve.dtype = "", "float32"
  try:
    step_dir, meta = ckpt_lib.load_meta(FLAGS.checkpoint)
    saved = meta["config"]
    if saved["model"].get("quantize"):
      cli.fail(f"--checkpoint={FLAGS.checkpoint} is {saved['model']['quantize']} already")
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    model, saved, files = loading.load_model(step_dir, config, named - {"model.dtype",
                                                                         "model.param_dtype"},
                                             mesh, saved["model"]["max_seq_len"])
    target = dataclasses.replace(model.config, quantize=quantize, dtype=dtype,
                                 param_dtype=dtype, kv_cache_dtype="",
                                 quantize_group=config.model.quantize_group)
    tokens = None
    if FLAGS.method != "rtn":
      documents = pipeline.iter_documents(pipeline.corpus_files(
          [p for p in files.split(",") if p.strip()]))
      # the training documents, read only as far as the calibration rows need
      train = (doc for i, doc in enumerate(documents) if not pipeline.held_out(i))
      tokens = calibration_rows(train, loading.load_tokenizer(step_dir, saved),
                                FLAGS.calibration_tokens,
                                min(CALIBRATION_ROW, target.max_seq_len))
  except FileNotFoundError as error:
    cli.fail(f"--checkpoint: {error}" if "checkpoint" in str(error) else str(error))
  except (ConfigError, ValueError) as error:
    cli.fail(str(error))
  float_bytes = parameter_bytes(nnx.state(model))
  began = time.perf_counter()
  model, report = calibration.quantize(model, target, tokens, FLAGS.method)
  report["seconds"] = round(time.perf_counter() - began, 1)
  params = nnx.to_pure_dict(nnx.state(model))
  if quantize == "int4":  # held in int8 on CPU (quantize.held_dtype); stored as int4
    params = jax.tree.map(lambda x: x.astype(jnp.int4) if x.dtype == jnp.int8 else x, params)
  resolved = dict(saved)
  resolved["model"] = dict(saved["model"], **{field: getattr(target, field) for field in (
      "quantize", "quantize_group", "dtype", "param_dtype", "kv_cache_dtype")})
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
                         {"step": 0, "config": resolved, "quantized_from": step_dir,
                          "quantization": report})
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  quantized_bytes = parameter_bytes(params)
  cli.summary([f"wrote {out}: {quantize} weights ({FLAGS.method}"
               f"{', %d calibration tokens' % report['calibration_tokens'] if tokens is not None else ''}"
               f", {report['seconds']} s), {quantized_bytes / 2**20:.1f} MiB of parameters "
               f"(float32: {float_bytes / 2**20:.1f} MiB)",
               f"next: python serve.py --checkpoint={out} --input=... --output=..."])
  print(json.dumps({"out": out, "parameter_bytes": quantized_bytes,
                    "float32_parameter_bytes": float_bytes, **report}))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint", "out"])
  app.run(main, flags_parser=cli.parse_flags)
