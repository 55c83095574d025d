"""What the evaluation tools share: a checkpoint with overrides, and token scoring.

`open_checkpoint(checkpoint, config, named, lengths)` rebuilds the model of any
checkpoint (a training run, an extended run or a converted Hugging Face model) on the
evaluation mesh, with the RoPE / dtype overrides the command line named
(configs/inherit.py), plus its tokenizer and its data files, and checks it can run at
every length; a problem the user can fix ends the program with one message. `Scorer`
gives log p(target) and the argmax of every token of [B, L] rows through the model's
sharded forward (zigzag order on a ring).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import inherit
from configs.cli import fail
from data import tokenizer as tokenizer_lib
from model import checkpoint as ckpt_lib, transformer
from model.config import AttentionConfig, ConfigError, RopeConfig, RopeScaling
from parallel import layout, mesh as mesh_lib, sharding

EVAL_MESH = {"data": 1, "fsdp": 1, "sequence": -1, "tensor": 1}  # all devices on the ring


def mesh_sizes(config, named) -> dict:
  """The mesh of an evaluation: every device on the ring unless --config.mesh.* says."""
  if any(field.startswith("mesh.") for field in named):
    return config.mesh.to_dict()
  return dict(EVAL_MESH)


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


def end_of_sequence_ids(saved: dict) -> list[int]:
  """A converted Hugging Face model's eos_token_id(s) from its saved config ([] if none)."""
  eos = (saved.get("hf") or {}).get("eos_token_id")
  return [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def open_checkpoint(checkpoint: str, config, named: set[str], lengths: list[int],
                    with_tokenizer: bool = True):
  """(mesh, model, tokenizer, data.files) of `checkpoint` with the named overrides, on
  the evaluation mesh, extended to max(lengths) and validated at each length (tokenizer
  None unless `with_tokenizer`). A missing checkpoint or tokenizer, a bad override or a
  length the mesh cannot split ends the program with one message (configs.cli.fail)."""
  try:
    mesh = mesh_lib.make_mesh(mesh_sizes(config, named))
    model, saved, files = load_model(checkpoint, config, named, mesh, max(lengths))
    for length in lengths:  # ("data.seq_len" in the messages: the tool's lengths here)
      mesh_lib.validate(model.config, mesh, seq_len=length)
    tokenizer = (load_tokenizer(ckpt_lib.find_step_dir(checkpoint), saved)
                 if with_tokenizer else None)
  except FileNotFoundError as error:
    fail(f"--checkpoint: {error}" if "checkpoint" in str(error) else str(error))
  except (ConfigError, ValueError) as error:
    fail(str(error))
  return mesh, model, tokenizer, files


def load_model(checkpoint: str, config, named: set[str], mesh, seq_len: int,
               abstract: bool = False):
  """(model, saved run config, data.files): the model of `checkpoint` on `mesh`, with
  the overrides the command line named, extended (if asked) to `seq_len` tokens.
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
  build = transformer.abstract if abstract else transformer.load
  model = build(step_dir, mesh, AttentionConfig(**config.attention.to_dict()), **overrides)[0]
  return model, saved, files


class Scorer:
  """log p(targets) and greedy predictions of rows [B, L] through the model's forward.

  Rows are laid out batch over (data, fsdp) and tokens over the ring in zigzag order;
  one compilation per (B, L). B is padded up to a multiple of the data shards.
  """

  def __init__(self, model, mesh):
    self.mesh = mesh
    self.ring = mesh.shape["sequence"]
    self.data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    graphdef, state = nnx.split(model)
    self.state = state

    @jax.jit
    def score(state, tokens, positions, targets):
      logits = nnx.merge(graphdef, state)(tokens, positions)
      log_probs = jax.nn.log_softmax(logits)
      target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
      return target_log_probs, jnp.argmax(logits, -1).astype(jnp.int32)

    self._score = score
    self._sharding = sharding.named_sharding(mesh, ("batch", "sequence"))

  def __call__(self, tokens: np.ndarray, targets: np.ndarray):
    """tokens, targets [B, L] int -> (log p(target) [B, L] float32, argmax [B, L] int32)."""
    rows, length = tokens.shape
    padded = -(-rows // self.data_shards) * self.data_shards
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], padded - rows, 0)]) if padded > rows \
        else x
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (padded, length))
    arrays = [jax.device_put(layout.to_zigzag(np.ascontiguousarray(x, np.int32), self.ring),
                             self._sharding)
              for x in (pad(tokens), positions, pad(targets))]
    log_probs, predictions = self._score(self.state, *arrays)
    return (layout.from_zigzag(np.asarray(log_probs), self.ring)[:rows],
            layout.from_zigzag(np.asarray(predictions), self.ring)[:rows])
