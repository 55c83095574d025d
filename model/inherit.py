"""A run's settings inherited from the checkpoint it starts from (init_from, eval tools).

A model extended, evaluated or served from a checkpoint keeps the checkpoint's shape,
data files and tokenizer; the caller's config decides only what it sets: fields named
on the command line, or set by its config file to something other than
the default (model/config.py's).
"""

from core.errors import ConfigError
from model.config import ModelConfig, defaults as defaults_of


def _flat(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _set(tree: dict, field: str, value):
  *parents, last = field.split(".")
  for key in parents:
    tree = tree[key]
  tree[last] = value


SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
                "norm_eps", "tie_embeddings", "qkv_bias")


def extension_settings(config, saved: dict, named: set[str]) -> tuple[dict, str]:
  """(model fields, data.files) of a run that starts from a checkpoint whose saved
  config is `saved` (config.init_from).

  The model's shape comes from the checkpoint. Its other fields (RoPE, max_seq_len,
  dtypes, remat) and data.files come from the checkpoint as well, unless this run
  sets them: on the command line (`named`) or in its config file (a model field other
  than its default in model/config.py, data.files other than "", which means "the
  default corpus" and so, here, the checkpoint's). A scaling factor of 0 becomes new
  length / trained length, and original_max_len the trained length (the original one,
  through earlier extensions).
  """
  defaults = _flat({"model": defaults_of(ModelConfig), "data": {"files": ""}})
  current = _flat(config.to_dict())
  chosen = lambda field: field in named or current.get(field) != defaults.get(field)
  model = ModelConfig.from_dict(saved["model"]).to_dict()
  saved_flat = _flat({"model": model})
  for field, value in current.items():
    if not field.startswith("model.") or field not in saved_flat:
      continue
    name = field[len("model."):]
    if name in SHAPE_FIELDS:
      if field in named and value != saved_flat[field]:
        raise ConfigError(f"--config.{field}={value}, but init_from={config.init_from} holds a "
                          f"model with {field}={saved_flat[field]}; the shape comes from the "
                          "checkpoint (drop the flag)")
      continue
    if chosen(field):
      _set(model, name, value)
  seq_len = config.data.seq_len
  scaling = model["rope"]["scaling"]
  saved_scaling = saved["model"].get("rope", {}).get("scaling", {})
  trained = (saved_scaling.get("original_max_len") or saved.get("data", {}).get("seq_len")
             or saved["model"]["max_seq_len"])
  if scaling["type"] != "none":
    if scaling["factor"] == 0:
      scaling["factor"] = seq_len / trained
    if scaling["original_max_len"] == 0:
      scaling["original_max_len"] = trained
  if not chosen("model.max_seq_len"):
    model["max_seq_len"] = max(saved["model"]["max_seq_len"], seq_len)
  files = config.data.files if chosen("data.files") else saved.get("data", {}).get("files", "")
  return model, files
