"""Causal attention, forward + backward, on the 8-device CPU mesh: ringlm against its peers.

  python -m bench.attention            # L = 16K and 32K, two head shapes (~20 min on 2 cores)
  python -m bench.attention --quick    # L = 2K, one repeat (a smoke run, ~1 min)
  python -m bench.attention --window=4096 --lengths=32768 --shapes=8x64 --impls=ringlm
                                       # sliding window against full causal (~4 min)

In one process and one run:
  ringlm        parallel.ring.ring_attention, zigzag order, the backend's kernel (xla on CPU)
  ringattention the `ringattention` 0.1.2 package's ring (natural order, 512-token chunks)
  xla-1dev      jax.nn.dot_product_attention on one device (run only where it fits)
  ringlm-wW     with --window=W: ring_attention with a sliding window of W tokens, natural
                order (with a window the ring shortens in natural order, and the work is
                even without zigzag); its speed-up is against full causal `ringlm`
Batch 1, float32. Useful FLOPs count the four matmuls of forward + backward once
(3 × 4·L²·H·D / 2 with the causal half); recomputation is not useful work. The
matmul peak is measured in the same run. Prints a table and writes JSON.
"""

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

NUM_DEVICES = 8


def _implementations(mesh, length, heads, head_dim, window=0):
  """name -> (function of (q, k, v, dout) returning grads, input transform, devices used)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from parallel import layout
  from parallel.ring import ring_attention

  ring = mesh.shape["sequence"]
  positions = jnp.asarray(layout.to_zigzag(np.arange(length, dtype=np.int32)[None], ring))

  def ringlm(q, k, v, dout):
    attend = lambda q, k, v: ring_attention(q, k, v, positions=positions, mesh=mesh)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)

  jax.lib.xla_bridge = jax._src.xla_bridge  # ringattention 0.1.2 reads this at import
  import ringattention
  chunk = min(512, length // ring)
  options = dict(causal_block_size=1, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                 query_chunk_size=chunk, key_chunk_size=chunk, dtype=jnp.float32,
                 policy=jax.checkpoint_policies.nothing_saveable, precision=None,
                 prevent_cse=True)
  spec = jax.P(None, "sequence")
  peer_ring = jax.shard_map(
      lambda q, k, v: ringattention.ringattention_jax(q, k, v, None, None, None, "sequence",
                                                      True, options),
      mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)

  def peer(q, k, v, dout):
    out, vjp = jax.vjp(peer_ring, q, k, v)
    return out, vjp(dout)

  def dense(q, k, v, dout):
    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                          implementation="xla")
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)

  natural = jnp.arange(length, dtype=jnp.int32)[None]

  def windowed(q, k, v, dout):
    attend = lambda q, k, v: ring_attention(q, k, v, positions=natural, mesh=mesh, window=window)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)

  zigzag = lambda x: layout.to_zigzag(x, ring)
  impls = {"ringlm": (ringlm, zigzag, NUM_DEVICES),
           "ringattention": (peer, lambda x: x, NUM_DEVICES),
           "xla-1dev": (dense, lambda x: x, 1)}
  if window:
    impls[f"ringlm-w{window}"] = (windowed, lambda x: x, NUM_DEVICES)
  return impls


def run_case(mesh, length, heads, head_dim, repeats, peak, memory_limit, window=0, impls=None):
  """Compiles every implementation, then times them interleaved (one run of each per
  round, after one warm-up round), so drift of the shared machine hits all alike."""
  import jax
  import numpy as np

  from bench.common import planned_bytes
  from parallel import layout

  rng = np.random.default_rng(0)
  inputs = [rng.standard_normal((1, length, heads, head_dim)).astype(np.float32)
            for _ in range(4)]  # q, k, v, dout
  useful_flops = 3 * 4 * length**2 * heads * head_dim / 2
  # A window W: each query sees min(p + 1, W) keys.
  window_flops = 3 * 4 * heads * head_dim * (window * length - window * (window - 1) / 2)
  rows, runs, outputs = [], {}, {}
  for name, (fn, transform, devices) in _implementations(mesh, length, heads, head_dim,
                                                         window).items():
    if impls and name not in impls and not name.startswith("ringlm-w"):
      continue
    if devices == 1:
      sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
      sharding = jax.NamedSharding(mesh, jax.P(None, "sequence"))
    args = [jax.device_put(transform(x), sharding) for x in inputs]
    compiled = jax.jit(fn).lower(*args).compile()
    memory = planned_bytes(compiled) * devices
    row = {"impl": name, "seq_len": length, "heads": heads, "head_dim": head_dim,
           "devices": devices, "planned_memory_bytes": memory, "times_s": []}
    rows.append(row)
    if memory > memory_limit:
      row["skipped"] = f"needs {memory / 2**30:.1f} GiB > {memory_limit / 2**30:.0f} GiB"
      print(f"  {name:<14} skipped: {row['skipped']}", flush=True)
      continue
    out = np.asarray(compiled(*args)[0])  # the warm-up run
    outputs[name] = layout.from_zigzag(out, NUM_DEVICES) if name == "ringlm" else out
    runs[name] = (compiled, args, row)
  for _ in range(repeats):
    for compiled, args, row in runs.values():
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      row["times_s"].append(time.perf_counter() - start)
  for compiled, args, row in runs.values():
    median = statistics.median(row["times_s"])
    flops = window_flops if row["impl"].startswith("ringlm-w") else useful_flops
    row.update(median_s=median, useful_flops_per_s=flops / median,
               percent_of_peak=100 * flops / median / peak)
    if row["impl"].startswith("ringlm-w"):
      row["window"] = window
    print(f"  {row['impl']:<14} {median:8.2f} s  {row['useful_flops_per_s'] / 1e9:7.1f} GFLOP/s "
          f"({row['percent_of_peak']:4.1f}% of peak)  "
          f"{row['planned_memory_bytes'] / 2**30:6.2f} GiB", flush=True)
  peer = runs.get("ringattention", (None, None, {}))[2]
  full = runs.get("ringlm", (None, None, {}))[2]
  for row in rows:
    if row["impl"].startswith("ringlm-w") and "median_s" in full and "median_s" in row:
      row["speedup_vs_full_causal"] = full["median_s"] / row["median_s"]
      row["flop_ratio_vs_full_causal"] = useful_flops / window_flops
    if "median_s" in peer and "median_s" in row:
      row["speedup_vs_ringattention"] = peer["median_s"] / row["median_s"]
    if row["impl"] in outputs and row["impl"] != "ringlm" and "ringlm" in outputs:
      row["max_abs_diff_vs_ringlm"] = float(np.abs(outputs[row["impl"]] - outputs["ringlm"]).max())
  return rows


def decode_cache(length, window, heads, head_dim, chunk=512):
  """The serving cache one request of `length` tokens holds (serving/slots.py: its row
  and the staging row, one layer of `heads` kv heads x `head_dim`, float32), with and
  without a sliding window: each allocated on one device and its bytes counted."""
  import jax

  from model import kv_cache
  from model.config import ModelConfig
  from parallel.mesh import make_mesh
  from serving.slots import SlotEngine

  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  sizes = {}
  for name, w in (("full", 0), (f"window {window}", window)):
    config = ModelConfig(vocab_size=256, dim=heads * head_dim, n_layers=1, n_heads=heads,
                         n_kv_heads=heads, head_dim=head_dim, window=w)
    layout = SlotEngine.row_layout(config, length, chunk, 1)
    cache = kv_cache.empty_slots(config, mesh, 2, layout.capacity, rolling=layout.rolling,
                                 kept=layout.kept)
    sizes[name] = {"slots_per_row": layout.capacity, "rolling": layout.rolling,
                   "bytes": int(sum(x.nbytes for x in jax.tree.leaves(cache)))}
    del cache
  full, windowed = sizes["full"]["bytes"], sizes[f"window {window}"]["bytes"]
  return {"context": length, "window": window, "prefill_chunk": chunk, "caches": sizes,
          "windowed_over_full": windowed / full}


def format_table(rows, peak):
  lines = [f"matmul peak (measured): {peak / 1e9:.1f} GFLOP/s", "",
           "| L | heads x dim | impl | median s | speed-up (vs ringattention, or as stated) "
           "| useful GFLOP/s | % of peak | memory GiB | max abs diff vs ringlm |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    shape = f"{r['heads']} x {r['head_dim']}"
    memory = f"{r['planned_memory_bytes'] / 2**30:.2f}"
    if "skipped" in r:
      lines.append(f"| {r['seq_len']} | {shape} | {r['impl']} | skipped ({r['skipped']}) | | | "
                   f"| {memory} | |")
      continue
    diff = f"{r['max_abs_diff_vs_ringlm']:.1e}" if "max_abs_diff_vs_ringlm" in r else ""
    if r["impl"].startswith("ringlm-w"):
      diff = ""  # another mask: not comparable
    versus = (f"{r['speedup_vs_ringattention']:.2f}x" if "speedup_vs_ringattention" in r
              else "")
    if "speedup_vs_full_causal" in r:
      versus = (f"{r['speedup_vs_full_causal']:.2f}x vs full causal (FLOPs "
                f"{r['flop_ratio_vs_full_causal']:.1f}x fewer)")
    lines.append(f"| {r['seq_len']} | {shape} | {r['impl']} | {r['median_s']:.2f} | "
                 f"{versus} | "
                 f"{r['useful_flops_per_s'] / 1e9:.1f} | {r['percent_of_peak']:.1f} | {memory} | "
                 f"{diff} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="L=2048, one repeat")
  parser.add_argument("--lengths", default="16384,32768")
  parser.add_argument("--shapes", default="8x64,4x128", help="heads x head_dim, comma-separated")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--window", type=int, default=0,
                      help="also time ringlm with this sliding window (natural order)")
  parser.add_argument("--impls", default="",
                      help="comma-separated subset of ringlm,ringattention,xla-1dev (default all)")
  parser.add_argument("--memory_limit_gib", type=float, default=12.0,
                      help="skip an implementation whose planned memory exceeds this")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
  args = parser.parse_args(argv)
  if args.quick:
    args.lengths, args.repeats = "2048", 1

  import jax
  jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
  from bench.common import machine, matmul_peak, write_json
  from parallel.mesh import make_mesh

  mesh = make_mesh({"sequence": NUM_DEVICES})
  peaks = matmul_peak(mesh)
  peak = peaks["peak_flops"]
  print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s (one device {peaks['one_device_flops'] / 1e9:.1f},"
        f" all {NUM_DEVICES} at once {peaks['all_devices_flops'] / 1e9:.1f})", flush=True)
  rows = []
  for length in map(int, args.lengths.split(",")):
    for shape in args.shapes.split(","):
      heads, head_dim = map(int, shape.split("x"))
      print(f"L={length} heads={heads} head_dim={head_dim}", flush=True)
      rows += run_case(mesh, length, heads, head_dim, args.repeats, peak,
                       args.memory_limit_gib * 2**30, window=args.window,
                       impls=[i for i in args.impls.split(",") if i])
  table = format_table(rows, peak)
  cache = None
  if args.window:
    heads, head_dim = map(int, args.shapes.split(",")[0].split("x"))
    cache = decode_cache(max(map(int, args.lengths.split(","))), args.window, heads, head_dim)
    table += (f"\n\nDecode cache of one {cache['context']}-token request (serve.py's slot "
              f"engine, 512-token prefill chunks): full "
              f"{cache['caches']['full']['bytes'] / 2**20:.1f} MiB per layer, window "
              f"{args.window} {cache['caches'][f'window {args.window}']['bytes'] / 2**20:.1f} "
              f"MiB (a rolling row of {cache['caches'][f'window {args.window}']['slots_per_row']}"
              f" slots): {cache['windowed_over_full']:.3f} of the full cache.")
  print("\n" + table)
  stamp = datetime.date.today().isoformat()
  out = args.out or os.path.join("bench", "results",
                                 f"attention-{stamp}-{socket.gethostname()}"
                                 f"{f'-window{args.window}' if args.window else ''}"
                                 f"{'-quick' if args.quick else ''}.json")
  write_json(out, {"benchmark": "attention", "machine": machine(), "matmul": peaks,
                   "args": vars(args), "rows": rows, "decode_cache": cache, "table": table})


if __name__ == "__main__":
  sys.exit(main())
