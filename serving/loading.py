"""A model and its tokenizer from a checkpoint: a training run, an extended run or a
converted Hugging Face model, with the overrides a command line named."""

import os

from core import devices as devices_lib
from data import tokenizer as tokenizer_lib
from model import checkpoint as ckpt_lib, inherit, transformer
from model.config import AttentionConfig, RopeConfig, RopeScaling


def end_of_sequence_ids(saved: dict) -> list[int]:
  """A converted Hugging Face model's eos_token_id(s) from its saved config ([] if none)."""
  eos = (saved.get("hf") or {}).get("eos_token_id")
  return [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def load_tokenizer(step_dir: str, saved: dict, required: bool = True):
  """The tokenizer stored with a checkpoint's run (its assets), or None when it has none
  and `required` is False. Its end-of-sequence id comes from a converted model's config."""
  assets = os.path.join(ckpt_lib.run_dir(step_dir), "assets")
  eos_ids = end_of_sequence_ids(saved)
  try:
    return tokenizer_lib.load(assets, eos_ids[0] if eos_ids else None)
  except FileNotFoundError:
    if required:
      raise
    return None


def mesh_named(named: set[str]) -> bool:
  """Whether the command line named a mesh field (--config.mesh.*; `named`: the config
  fields it named, cli.start's): then that mesh is used as given."""
  return any(field.startswith("mesh.") for field in named)


def choose_mesh(config, named: set[str], longest: int, devices=None, slots_split=True):
  """(mesh, why) to serve on: --config.mesh.* when the command line named any; else every
  device on the ring (sequence) when a request needs it (serve.cache_sharding; `longest`:
  the longest request's prompt + max_tokens), or on the batch. On CPU, one device for
  the batch, since virtual devices share the same cores and each would hold a copy of
  the parameters (measured: 8 virtual devices decode at about half the speed of one).
  `devices`: default jax.devices() (tools/aot.py passes a TPU slice's compile-only ones).
  `slots_split=False` (the HTTP server, whose slots stay whole on the ring): the ring
  over every device wherever the batch would have been split over them."""
  import jax

  from parallel import mesh as mesh_lib
  devices = jax.devices() if devices is None else list(devices)
  if mesh_named(named):
    return mesh_lib.make_mesh(config.mesh.to_dict(), devices), "--config.mesh.* on the command line"
  long_context = f"serve.long_context={config.serve.long_context}"
  if _cache_sharding(config, longest) == "sequence":
    why = (f"a request of {longest} tokens >= {long_context}"
           if config.serve.cache_sharding == "auto" else "serve.cache_sharding=sequence")
    return mesh_lib.make_mesh({"sequence": -1}, devices), f"{why}: the ring over every device"
  if devices[0].platform == "cpu":
    return (mesh_lib.make_mesh({"data": 1}, devices[:1]),
            f"CPU and no request of {long_context} tokens or more: one device (virtual "
            "devices share the cores)")
  if not slots_split:
    return (mesh_lib.make_mesh({"sequence": -1}, devices),
            "the server's slots are not split over devices: the ring over every device")
  return mesh_lib.make_mesh({"data": -1}, devices), "short requests: every device on the batch"


def _cache_sharding(config, longest: int) -> str:
  """"sequence" (the ring) or "batch": serve.cache_sharding, "auto" resolved by whether
  the longest request reaches serve.long_context."""
  choice = config.serve.cache_sharding
  if choice not in ("auto", "sequence", "batch"):
    raise ValueError(f"serve.cache_sharding={choice!r}: use auto, sequence or batch")
  if choice == "auto":
    choice = "sequence" if longest >= config.serve.long_context else "batch"
  return choice


def cpu_devices_needed(config, named: set[str], longest: int) -> int:
  """The virtual CPU devices `choose_mesh` uses with the same arguments on a CPU host,
  which serve.py makes unless --cpu_devices says: those of a named mesh, the ring's
  (core.devices.CPU_DEVICES) when a request needs it, else one. A device the mesh leaves
  unused still costs time: measured on bench/decode.py's 58M model, 32 x 128 -> 128
  bf16, 2026-12-06, one device decoded in 4.1 s in a process of 1 or 2 virtual devices
  and in 5.5 s in a process of 8."""
  if mesh_named(named):
    return devices_lib.for_mesh(config.mesh.to_dict())
  if _cache_sharding(config, longest) == "sequence":
    return devices_lib.CPU_DEVICES
  return 1


def load_model(checkpoint: str, config, named: set[str], mesh, seq_len: int,
               abstract: bool = False):
  """(model, saved run config, data.files): the model of `checkpoint` on `mesh`, with
  the overrides the command line named (model/inherit.py), extended (if asked) to
  `seq_len` tokens. `config` is a full ringlm config (configs/base.py's fields).
  `abstract`: parameters as shapes and shardings only (transformer.abstract)."""
  step_dir, meta = ckpt_lib.load_meta(checkpoint)
  saved = meta["config"]
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.init_from = checkpoint
    config.data.seq_len = seq_len
  model_dict, files = inherit.extension_settings(config, saved, named)
  overrides = {key: value for key, value in model_dict.items()
               if key not in inherit.SHAPE_FIELDS}
  rope = overrides.pop("rope")
  overrides["rope"] = RopeConfig(theta=rope["theta"], scaling=RopeScaling(**rope["scaling"]))
  # Serving and scoring never differentiate, so a training run's remat has nothing to
  # save (and nnx.remat inside the engines' jit raised TraceContextError on every request).
  overrides["remat"] = "none"
  overrides.update(serving_precision(config, named, overrides, mesh))
  build = transformer.abstract if abstract else transformer.load
  model = build(step_dir, mesh, AttentionConfig(**config.attention.to_dict()), **overrides)[0]
  return model, saved, files


SERVE_DTYPES = ("", "float32", "bfloat16")


def serving_precision(config, named: set[str], model: dict, mesh) -> dict:
  """The model fields serve.dtype sets (dtype and param_dtype, unless the command line
  named model.dtype or model.param_dtype) and serve.quantize (model.quantize). The KV
  cache holds model.kv_cache_dtype ("": the compute dtype); how a bfloat16 one is
  stored on CPU: model/kv_cache.held_dtype."""
  from core.errors import ConfigError
  from model import config as model_config
  dtype = config.serve.dtype
  if dtype not in SERVE_DTYPES:
    raise ConfigError(f"serve.dtype={dtype!r}; use bfloat16, float32 or \"\" (the "
                      "checkpoint's)")
  fields = {}
  if dtype and not named & {"model.dtype", "model.param_dtype"}:
    fields = dict(dtype=dtype, param_dtype=dtype)
  if config.serve.quantize not in model_config.QUANTIZE:
    raise ConfigError(f"serve.quantize={config.serve.quantize!r}; use int8, int4 or \"\" "
                      "(the checkpoint's weights)")
  if config.serve.quantize:
    fields["quantize"] = config.serve.quantize
  return fields
