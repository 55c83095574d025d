"""Hugging Face Llama / Mistral / Qwen2 checkpoints into ringlm, and back.

  python -m tools.convert_hf --hf_dir=HF_DIR --out=RUN_DIR [--dtype=bfloat16]
  python -m tools.convert_hf --to_hf --checkpoint=RUN_DIR --out=HF_DIR [--max_shard_gb=5]

In: config.json + *.safetensors (one file or sharded with its index) become a ringlm
run directory: config.json (the ringlm config, with the origin under "hf"), assets/
(the tokenizer files, copied) and checkpoints/0 (the parameters, orbax, with
checksums), which train.py (init_from), the eval tools and serve.py read. Tensors
are read and converted one at a time, so peak memory stays near one
copy of the parameters. The dtype is kept unless --dtype says otherwise.

Out: config.json (the `rope_parameters` / `dtype` form) + safetensors that
transformers' from_pretrained loads, RoPE scaling of an extended model included,
plus the run's tokenizer files.

Either way nothing appears at --out unless the conversion completes: it is written
to a temporary directory beside it and renamed. Problems (a missing tensor, a shape
that does not match config.json, an unsupported architecture or RoPE type) stop with
one message naming the tensor or field, exit status 2.
"""

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "generation_config.json", "*.tiktoken")
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def _abstract_params(model_config):
  """{path: ShapeDtypeStruct} of a ringlm model, nothing allocated."""
  from flax import nnx

  from model.transformer import Transformer
  abstract = nnx.eval_shape(lambda: Transformer(model_config, None, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract))


def _lookup(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _assign(tree, path, value):
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _copy_tokenizer(source_dir, target_dir):
  os.makedirs(target_dir, exist_ok=True)
  copied = []
  for pattern in TOKENIZER_FILES:
    for path in sorted(glob.glob(os.path.join(source_dir, pattern))):
      shutil.copy2(path, target_dir)
      copied.append(os.path.basename(path))
  return copied


def from_hf(hf_dir: str, out_dir: str, dtype: str | None = None) -> dict:
  """Converts a Hugging Face model directory into a ringlm run directory (out_dir,
  written to a temporary directory and renamed). Returns the ringlm config dict."""
  import jax
  import numpy as np

  from configs import base
  from model import checkpoint, hf, safetensors

  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(config_path):
    raise hf.ConversionError(f"--hf_dir: no config.json in {hf_dir}")
  with open(config_path) as f:
    hf_config = json.load(f)
  model_config, origin = hf.model_config_from_hf(hf_config, dtype)
  try:
    reader = safetensors.Reader(hf_dir)
  except safetensors.SafetensorsError as error:
    raise hf.ConversionError(f"--hf_dir: {error}") from None
  entries = hf.tensor_map(model_config)
  known = {name for name, _, _ in entries}
  for name in reader.files:
    tied_head = name == "lm_head.weight" and model_config.tie_embeddings
    if name not in known and not tied_head and not name.endswith(IGNORED_TENSORS):
      raise hf.ConversionError(f"tensor {name} has no place in a {origin['architecture']} "
                               "ringlm model (an unsupported variant?)")
  targets = _abstract_params(model_config)
  params = targets  # filled in place, tensor by tensor
  for name, path, layout in entries:
    target = _lookup(targets, path)
    if name not in reader:
      raise hf.ConversionError(f"tensor {name} is missing from the safetensors in {hf_dir}")
    expected = hf.hf_shape(layout, target.shape)
    if reader.shape(name) != expected:
      raise hf.ConversionError(f"tensor {name} has shape {list(reader.shape(name))}; "
                               f"config.json implies {list(expected)}")
    array = hf.to_ringlm(np.asarray(reader[name]), layout, target.shape)
    _assign(params, path, jax.device_put(np.ascontiguousarray(array.astype(target.dtype))))

  resolved = base.get_config().to_dict()
  resolved["model"] = model_config.to_dict()
  resolved["data"]["seq_len"] = model_config.max_seq_len  # the context it was trained at
  resolved["hf"] = origin
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2, default=str)
    _copy_tokenizer(hf_dir, os.path.join(tmp, "assets"))
    checkpoint.save_params(os.path.join(tmp, "checkpoints", "0"), params,
                           json.loads(json.dumps({"step": 0, "config": resolved}, default=str)))
    os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return resolved


def to_hf(checkpoint_dir: str, out_dir: str, max_shard_bytes: int = 5 * 2**30) -> dict:
  """Writes a ringlm checkpoint as a Hugging Face model directory. Returns config.json."""
  import jax
  import numpy as np

  from model import checkpoint, hf, safetensors
  from model.config import ModelConfig

  try:
    step_dir, meta = checkpoint.load_meta(checkpoint_dir)
  except FileNotFoundError as error:
    raise hf.ConversionError(f"--checkpoint: {error}") from None
  model_config = ModelConfig.from_dict(meta["config"]["model"])
  if model_config.quantize:
    raise hf.ConversionError(f"--checkpoint={checkpoint_dir} has int8 weights "
                             "(tools/quantize.py); export the float checkpoint it came from")
  hf_config = hf.hf_config_from_model(model_config, meta["config"].get("hf"))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                         _abstract_params(model_config))
  params, _ = checkpoint.load_params(step_dir, targets)
  tensors = {}
  for name, path, layout in hf.tensor_map(model_config):
    leaf = _lookup(params, path)
    tensors[name] = (hf.hf_shape(layout, leaf.shape), leaf.dtype,
                     lambda leaf=leaf, layout=layout: hf.to_hf(np.asarray(leaf), layout))
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    safetensors.write(tmp, tensors, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    # the run's assets: next to checkpoints/ in a workdir
    _copy_tokenizer(os.path.join(checkpoint.run_dir(step_dir), "assets"), tmp)
    os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return hf_config


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hf_dir", help="Hugging Face model directory to convert into ringlm")
  parser.add_argument("--to_hf", action="store_true", help="convert a ringlm checkpoint to HF")
  parser.add_argument("--checkpoint", help="ringlm run directory or checkpoint step (--to_hf)")
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                      help="parameter dtype of the ringlm checkpoint (default: the model's)")
  parser.add_argument("--max_shard_gb", type=float, default=5.0,
                      help="--to_hf: safetensors files of at most this size")
  args = parser.parse_args(argv)

  def fail(message):
    print(f"error: {message}", file=sys.stderr)
    return 2

  if os.path.exists(args.out):
    return fail(f"--out={args.out} exists; choose a new directory (nothing is overwritten)")
  if args.to_hf != (args.checkpoint is not None) or args.to_hf == (args.hf_dir is not None):
    return fail("give either --hf_dir (HF -> ringlm) or --to_hf --checkpoint (ringlm -> HF)")
  import jax
  jax.config.update("jax_platforms", "cpu")  # conversion is host work
  from model.hf import ConversionError
  try:
    if args.to_hf:
      to_hf(args.checkpoint, args.out, int(args.max_shard_gb * 2**30))
    else:
      from model.safetensors import SafetensorsError
      try:
        from_hf(args.hf_dir, args.out, args.dtype)
      except SafetensorsError as error:
        raise ConversionError(str(error)) from None
  except ConversionError as error:
    return fail(str(error))
  import cli
  if args.to_hf:
    cli.summary([f"wrote {args.out} (config.json, safetensors, tokenizer files)",
                 f"next: transformers.AutoModelForCausalLM.from_pretrained({args.out!r})"])
  else:
    cli.summary([f"wrote {args.out} (a ringlm run: config.json, assets/, checkpoints/0)",
                 f"next: python -m tools.eval_ppl --checkpoint={args.out}   or   "
                 f"python train.py --config=configs/extend.py --workdir=NEW "
                 f"--config.init_from={args.out} --config.data.seq_len=LONGER"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
