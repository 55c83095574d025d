"""Forward and backward of a model at a long sequence on the ring, checked against one device.

  python -m tools.ring_check --config=configs/tiny.py [--seq_len=16384]   # = make ring-check

Tokens are the bytes of the Python standard library's sources (real text, no
download). The ring run puts every device on the ring (zigzag layout); the reference
run puts the same model (same seed) on one device in natural order. Prints the time
of each, the memory XLA plans per device, the process's peak RSS, and how far the
loss, logits and parameter gradients of the two runs are apart.
"""

import glob
import os
import resource
import sys
import sysconfig
import time

from absl import app, flags
from ml_collections import config_flags

import cli

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "ringlm config file.")
  flags.DEFINE_integer("seq_len", 16384, "Tokens in the one row (all devices on the ring).")
  cli.define_flags()


def stdlib_bytes(count: int):
  """The first `count` bytes of the standard library's .py files, in sorted order."""
  import numpy as np
  chunks, total = [], 0
  for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
    with open(path, "rb") as f:
      chunks.append(f.read())
    total += len(chunks[-1])
    if total > count:
      break
  return np.frombuffer(b"".join(chunks)[:count], np.uint8).astype(np.int32)


def main(argv):
  del argv
  cli.start()
  import jax
  import numpy as np
  from flax import nnx

  from core.errors import ConfigError
  from model import transformer
  from model.config import AttentionConfig, ModelConfig
  from model.loss import target_log_probs
  from parallel import layout, mesh as mesh_lib

  config = FLAGS.config
  try:
    model_config = ModelConfig.from_dict(config.model.to_dict())
    attention = AttentionConfig(**config.attention.to_dict())
    mesh = mesh_lib.make_mesh({"sequence": -1})
    seq_len, batch = FLAGS.seq_len, 1
    mesh_lib.validate(model_config, mesh, seq_len=seq_len, batch_size=batch)
  except ConfigError as error:
    cli.fail(str(error))

  text = stdlib_bytes(batch * (seq_len + 1)).reshape(batch, seq_len + 1)
  tokens, targets = text[:, :-1], text[:, 1:]
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape)

  def loss_fn(model, tokens, positions, targets):
    logits = model(tokens, positions)
    return -target_log_probs(logits, targets).mean(), logits

  @nnx.jit
  def step(model, tokens, positions, targets):
    return nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens, positions, targets)

  def run(mesh, order):
    ring = mesh.shape["sequence"]
    permute = (lambda x: layout.to_zigzag(x, ring)) if order == "zigzag" else (lambda x: x)
    model = transformer.create(model_config, mesh, config.seed, attention)
    args = [permute(x) for x in (tokens, positions, targets)]
    start = time.perf_counter()
    compiled = step.lower(model, *args).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    (loss, logits), grads = compiled(model, *args)
    jax.block_until_ready(grads)
    run_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    per_device = (memory.temp_size_in_bytes + memory.argument_size_in_bytes +
                  memory.output_size_in_bytes - memory.alias_size_in_bytes)
    logits = np.asarray(logits)
    if order == "zigzag":
      logits = layout.from_zigzag(logits, ring)
    shape = "x".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1 device"
    print(f"  {shape:<28} compile {compile_s:6.1f} s   forward+backward {run_s:6.1f} s   "
          f"XLA memory per device {per_device / 2**20:8.1f} MiB   loss {float(loss):.4f}",
          flush=True)
    return float(loss), logits, jax.tree.map(np.asarray, nnx.to_pure_dict(grads)), run_s

  tokens_total = batch * seq_len
  print(f"ringlm ring check: {model_config.n_layers} layers, dim {model_config.dim}, "
        f"{model_config.n_heads} heads ({model_config.n_kv_heads} kv), "
        f"{model_config.param_count() / 1e6:.1f}M params; batch {batch} x {seq_len} tokens; "
        f"{jax.device_count()} {jax.default_backend()} devices", flush=True)
  ring_loss, ring_logits, ring_grads, ring_s = run(mesh, "zigzag")
  single = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  ref_loss, ref_logits, ref_grads, single_s = run(single, "natural")

  def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())

  grad_error = max(relative(a, b) for a, b in zip(jax.tree.leaves(ring_grads),
                                                   jax.tree.leaves(ref_grads)))
  logits_error = relative(ring_logits, ref_logits)
  flops = model_config.flops_per_token(seq_len) * tokens_total
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  same = grad_error < 1e-4 and logits_error < 1e-4 and abs(ring_loss - ref_loss) < 1e-5
  print(f"  ring / one device time: {ring_s / single_s:.2f}  "
        f"({flops / ring_s / 1e9:.1f} vs {flops / single_s / 1e9:.1f} GFLOP/s of model FLOPs)")
  print(f"  process peak RSS {peak_rss / 2**30:.2f} GiB")
  print(f"  ring equals one device: {'yes' if same else 'NO'}  (loss {ring_loss:.6f} vs "
        f"{ref_loss:.6f}; max relative difference: logits {logits_error:.1e}, "
        f"gradients {grad_error:.1e})")
  if not same:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
