"""What the evaluation tools (eval_ppl, eval_passkey, copy_probe) share: a checkpoint
opened on the evaluation mesh, a user's mistake turned into one message. They take
serve.py's precision flags (--config.serve.dtype, serve.quantize, model.kv_cache_dtype)
but evaluate in the checkpoint's own precision unless given.

The model, tokenizer and scoring themselves are the serving library's
(serving/loading.py, serving/scoring.py).
"""

import cli
from core import devices as devices_lib
from core.errors import ConfigError
from model import checkpoint as ckpt_lib
from parallel import mesh as mesh_lib
from serving import loading

EVAL_MESH = {"data": 1, "fsdp": 1, "sequence": -1, "tensor": 1}  # all devices on the ring


def mesh_sizes(config, named) -> dict:
  """The mesh of an evaluation: every device on the ring unless --config.mesh.* says."""
  if loading.mesh_named(named):
    return config.mesh.to_dict()
  return dict(EVAL_MESH)


def eval_devices(config, named):
  """The devices an evaluation runs on: all of them, but one on a CPU host unless
  --config.mesh.* asks for more (virtual CPU devices share the cores and each holds a
  copy of the parameters). On CPU the process makes only those (cli.set_cpu_devices)
  unless --cpu_devices says: an unused virtual device slows the used one too
  (serving.loading.cpu_devices_needed)."""
  import jax
  named_mesh = loading.mesh_named(named)
  cli.set_cpu_devices(devices_lib.for_mesh(config.mesh.to_dict()) if named_mesh else 1)
  devices = jax.devices()
  if devices[0].platform == "cpu" and not named_mesh:
    return devices[:1]
  return devices


def open_checkpoint(checkpoint: str, config, named: set[str], lengths: list[int],
                    with_tokenizer: bool = True):
  """(mesh, model, tokenizer, data.files) of `checkpoint` with the named overrides, on
  the evaluation mesh, extended to max(lengths) and validated at each length (tokenizer
  None unless `with_tokenizer`). A missing checkpoint or tokenizer, a bad override or a
  length the mesh cannot split ends the program with one message (cli.fail)."""
  config = config.copy_and_resolve_references()
  if "serve.dtype" not in named:  # evaluate as the checkpoint stores it unless told
    with config.unlocked():
      config.serve.dtype = ""
  try:
    mesh = mesh_lib.make_mesh(mesh_sizes(config, named), eval_devices(config, named))
    model, saved, files = loading.load_model(checkpoint, config, named, mesh, max(lengths))
    for length in lengths:  # ("data.seq_len" in the messages: the tool's lengths here)
      mesh_lib.validate(model.config, mesh, seq_len=length)
    tokenizer = (loading.load_tokenizer(ckpt_lib.find_step_dir(checkpoint), saved)
                 if with_tokenizer else None)
  except FileNotFoundError as error:
    cli.fail(f"--checkpoint: {error}" if "checkpoint" in str(error) else str(error))
  except (ConfigError, ValueError) as error:
    cli.fail(str(error))
  return mesh, model, tokenizer, files
