"""Training throughput of `tiny` on the 8-device CPU mesh: tokens/s and MFU.

  python -m bench.train                 # seq_len 2048 and 8192 (~6 min on 2 cores)
  python -m bench.train --quick         # seq_len 512, two timed steps (a smoke run)

One jit-compiled step of training/steps.py, as train.py runs it (loss, gradients, AdamW update) on random tokens,
one document per row, timed after a warm-up step; median over `--steps`. Each length
gets `--tokens_per_step` tokens (batch = tokens / seq_len). Model FLOPs are
ModelConfig.flops_per_token: 6 per matmul parameter plus attention with the causal
half, no recomputation counted. MFU = model FLOP/s / the machine's matmul peak,
measured in the same run (on CPU the 8 virtual devices share that peak).
Prints a table and writes JSON.
"""

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

NUM_DEVICES = 8


def build_step(seq_len: int, tokens_per_step: int, mesh_sizes: str = "", remat: str = "none"):
  """train.py's step for `tiny` at `seq_len`, compiled, with random-token inputs.

  Returns (compiled step, (params, opt_state, counters, batch), model config, mesh,
  compile_s).
  `mesh_sizes` is "data=2,sequence=4" style ("" = configs/tiny.py's mesh).
  """
  import numpy as np

  from configs import tiny
  from model.config import AttentionConfig, ModelConfig
  from parallel import mesh as mesh_lib, sharding
  from training import state as state_lib, steps as steps_lib

  config = tiny.get_config()
  config.data.seq_len = seq_len
  if mesh_sizes:
    config.mesh.update({axis: int(size) for axis, size in
                        (item.split("=") for item in mesh_sizes.split(","))})
  config.data.batch_size = max(tokens_per_step // seq_len, config.mesh.data)
  config.model.remat = remat
  model_config = ModelConfig.from_dict(config.model.to_dict())
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  mesh_lib.validate(model_config, mesh, seq_len=seq_len, batch_size=config.data.batch_size,
                    state_over_sequence=config.train.shard_state_over_sequence)
  state = state_lib.init_state(model_config, config.train, mesh, config.seed,
                               AttentionConfig(**config.attention.to_dict()))
  train_step, _ = steps_lib.make_steps(state.graphdef, state.tx, 1, state.shardings)
  params, opt_state, counters = state.params, state.opt_state, steps_lib.new_counters(mesh)

  batch_size = config.data.batch_size
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, model_config.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((batch_size, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len))}
  batch = sharding.put_batch(rows, mesh)

  start = time.perf_counter()
  compiled = train_step.lower(params, opt_state, counters, batch).compile()
  return (compiled, (params, opt_state, counters, batch), model_config, mesh,
          time.perf_counter() - start)


def run_length(seq_len, args, peak):
  """Compiles and times the train step at one length; returns the result row."""
  import jax
  import numpy as np

  compiled, (params, opt_state, counters, batch), model_config, mesh, compile_s = build_step(
      seq_len, args.tokens_per_step, args.mesh, args.remat)
  batch_size = batch["inputs"].shape[0]
  params, opt_state, counters, stats = compiled(params, opt_state, counters, batch)  # warm-up
  jax.block_until_ready(stats)
  times, losses = [], []
  for _ in range(args.steps):
    start = time.perf_counter()
    params, opt_state, counters, stats = compiled(params, opt_state, counters, batch)
    jax.block_until_ready((params, stats))
    times.append(time.perf_counter() - start)
    losses.append(float(stats["loss"]))
  if not all(np.isfinite(losses)):
    raise RuntimeError(f"non-finite loss in the benchmark: {losses}")

  step_s = statistics.median(times)
  tokens_per_step = batch_size * seq_len
  flops_per_token = model_config.flops_per_token(seq_len)
  attention_flops = model_config.flops_per_token(seq_len) - model_config.flops_per_token(0)
  model_flops_per_s = flops_per_token * tokens_per_step / step_s
  row = {"seq_len": seq_len, "batch_size": batch_size, "mesh": dict(mesh.shape),
         "remat": args.remat, "compile_s": compile_s, "step_times_s": times,
         "median_step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
         "flops_per_token": flops_per_token,
         "attention_share_of_flops": attention_flops / flops_per_token,
         "model_gflops_per_s": model_flops_per_s / 1e9,
         "tflops_per_device": model_flops_per_s / NUM_DEVICES / 1e12,
         "mfu": model_flops_per_s / peak, "losses": losses}
  print(f"  seq_len {seq_len:6d} batch {batch_size:3d}: {step_s:6.2f} s/step "
        f"{row['tokens_per_s']:8.0f} tok/s  {row['model_gflops_per_s']:6.1f} GFLOP/s  "
        f"MFU {100 * row['mfu']:4.1f}%  (compile {compile_s:.1f} s)", flush=True)
  return row


def format_table(rows, peak):
  lines = [f"matmul peak (measured): {peak / 1e9:.1f} GFLOP/s", "",
           "| seq_len | batch | mesh | s/step | tokens/s | model GFLOP/s | attention share "
           "| MFU | compile s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1)
    lines.append(f"| {r['seq_len']} | {r['batch_size']} | {mesh} | {r['median_step_s']:.2f} | "
                 f"{r['tokens_per_s']:.0f} | {r['model_gflops_per_s']:.1f} | "
                 f"{100 * r['attention_share_of_flops']:.0f}% | {100 * r['mfu']:.1f}% | "
                 f"{r['compile_s']:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="seq_len 512, two timed steps")
  parser.add_argument("--lengths", default="2048,8192")
  parser.add_argument("--tokens_per_step", type=int, default=16384)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per length")
  parser.add_argument("--mesh", default="", help="axis sizes, e.g. data=2,sequence=4 "
                      "(default: configs/tiny.py's)")
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
  args = parser.parse_args(argv)
  if args.quick:
    args.lengths, args.steps, args.tokens_per_step = "512", 2, 2048

  import jax
  jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
  from bench.common import machine, matmul_peak, write_json
  from parallel.mesh import make_mesh

  peaks = matmul_peak(make_mesh({"data": NUM_DEVICES}))
  peak = peaks["peak_flops"]
  print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
  rows = [run_length(int(length), args, peak) for length in args.lengths.split(",")]
  table = format_table(rows, peak)
  print("\n" + table)
  stamp = datetime.date.today().isoformat()
  out = args.out or os.path.join("bench", "results", f"train-{stamp}-{socket.gethostname()}"
                                 f"{'-quick' if args.quick else ''}.json")
  write_json(out, {"benchmark": "train", "machine": machine(), "matmul": peaks,
                   "args": vars(args), "rows": rows, "table": table})


if __name__ == "__main__":
  sys.exit(main())
