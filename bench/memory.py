"""Peak memory of one training step of `tiny` against context length: ring vs full attention.

  python -m bench.memory               # 2K ... 64K tokens (~10 min on 2 cores)
  python -m bench.memory --quick       # 1K, 2K (a smoke run)

Every (length, attention) pair runs in its own process, since peak resident memory
(ru_maxrss) is per process:
  ring  configs/tiny.py, one row of L tokens on a ring of 8 virtual devices
        (mesh sequence=8, zigzag order): train.py's step (loss, gradients, AdamW)
  full  the same step on one device with attention as jax.nn.dot_product_attention
        (XLA: the L x L scores are materialised); compiled for its planned memory and
        run only when that fits under --memory_limit_gib (the ring always runs)
The report gives each process's peak RSS after one step, XLA's planned bytes, and
for the ring the memory added per token between consecutive lengths: constant when
memory grows linearly with length (quadratic growth would double it per doubling),
checked from --linear_from (8K) on, below which fixed costs dominate.
Prints a table, writes JSON and a PNG plot.
"""

import argparse
import datetime
import json
import os
import resource
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RING_DEVICES = 8


def child(length: int, attention: str, memory_limit: float) -> dict:
  """One compiled step at `length` (in this process); its memory and time."""
  import jax
  jax.config.update("jax_num_cpu_devices", RING_DEVICES if attention == "ring" else 1)
  from bench.common import planned_bytes
  from bench.train import build_step

  if attention == "full":
    from parallel import ring

    def full_attention(q, k, v, *, positions, segment_ids=None, causal=True, mesh, **_):
      del positions, segment_ids, mesh  # one row in natural order: the causal mask is exact
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")

    ring.ring_attention = full_attention
  mesh_sizes = f"data=1,sequence={RING_DEVICES}" if attention == "ring" else "data=1"
  compiled, args, _, mesh, compile_s = build_step(length, length, mesh_sizes)
  planned = planned_bytes(compiled) * mesh.devices.size
  row = {"length": length, "attention": attention, "devices": mesh.devices.size,
         "compile_s": compile_s, "planned_bytes": planned}
  if attention == "full" and planned > memory_limit:
    row["skipped"] = f"needs {planned / 2**30:.1f} GiB planned > {memory_limit / 2**30:.0f} GiB"
    return row
  start = time.perf_counter()
  *_, stats = compiled(*args)
  jax.block_until_ready(stats)
  row.update(step_s=time.perf_counter() - start, loss=float(stats["loss"]),
             peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  return row


def run(length: int, attention: str, memory_limit_gib: float) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  result = subprocess.run([sys.executable, "-m", "bench.memory", "--child", str(length),
                           f"--attention={attention}", f"--memory_limit_gib={memory_limit_gib}"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
  if result.returncode != 0:
    return {"length": length, "attention": attention,
            "failed": " ".join(result.stderr.strip().splitlines()[-1:])[:300]}
  return json.loads(result.stdout.strip().splitlines()[-1])


def per_token_growth(rows: list, shortest: int) -> list:
  """Bytes of peak RSS added per token between consecutive measured ring lengths from
  `shortest` on (below it fixed costs dominate: parameters on 8 devices, compilation)."""
  measured = [r for r in rows if r["attention"] == "ring" and "peak_rss_bytes" in r
              and r["length"] >= shortest]
  return [{"from": a["length"], "to": b["length"],
           "bytes_per_token": (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (b["length"] - a["length"])}
          for a, b in zip(measured, measured[1:])]


def linearity(growth: list) -> dict:
  """How the per-token growth changes from the first measured doubling to the last.

  Linear memory keeps it constant (ratio 1); a quadratic term doubles it at every
  doubling (ratio 2**(n-1) over n doublings, 4 over three). Verdict: linear when the
  ratio is below 2 (between the two, geometrically, over the default lengths).
  """
  if len(growth) < 2:
    return {"slope_ratio": None, "linear": None}
  ratio = growth[-1]["bytes_per_token"] / growth[0]["bytes_per_token"]
  return {"slope_ratio": ratio, "linear": bool(ratio < 2)}


def format_table(rows: list) -> str:
  gib = lambda x: f"{x / 2**30:.2f}"
  lines = ["| tokens | attention | devices | peak RSS GiB | XLA planned GiB | step s |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if "failed" in r:
      lines.append(f"| {r['length']} | {r['attention']} | | failed: {r['failed']} | | |")
      continue
    rss = gib(r["peak_rss_bytes"]) if "peak_rss_bytes" in r else f"not run ({r['skipped']})"
    step = f"{r['step_s']:.1f}" if "step_s" in r else ""
    lines.append(f"| {r['length']} | {r['attention']} | {r['devices']} | {rss} | "
                 f"{gib(r['planned_bytes'])} | {step} |")
  return "\n".join(lines)


def plot(rows: list, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axis = plt.subplots(figsize=(6, 4))
  for attention, style in (("ring", "o-"), ("full", "s--")):
    points = [(r["length"], r["peak_rss_bytes"] / 2**30) for r in rows
              if r["attention"] == attention and "peak_rss_bytes" in r]
    planned = [(r["length"], r["planned_bytes"] / 2**30) for r in rows
               if r["attention"] == attention and "planned_bytes" in r]
    if points:
      axis.plot(*zip(*points), style, label=f"{attention}: peak RSS")
    if attention == "full" and planned:
      axis.plot(*zip(*planned), ":", color="gray", label="full: XLA planned")
  axis.set_xscale("log", base=2)
  axis.set_yscale("log", base=2)
  axis.set_xlabel("tokens in the step (one row)")
  axis.set_ylabel("GiB")
  axis.set_title("tiny, one training step: memory vs context", fontsize=9)
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="1K and 2K tokens")
  parser.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536")
  parser.add_argument("--linear_from", type=int, default=8192,
                      help="check linear growth from this length on")
  parser.add_argument("--memory_limit_gib", type=float, default=8.0,
                      help="full attention runs only when XLA plans less than this")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
  parser.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--attention", default="ring", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.child, args.attention, args.memory_limit_gib * 2**30)))
    return 0
  if args.quick:
    args.lengths, args.linear_from = "1024,2048", 1024

  from bench.common import machine, write_json
  rows = []
  for length in map(int, args.lengths.split(",")):
    for attention in ("ring", "full"):
      print(f"{length} tokens, {attention} attention", flush=True)
      rows.append(run(length, attention, args.memory_limit_gib))
  growth = per_token_growth(rows, args.linear_from)
  verdict = linearity(growth)
  table = format_table(rows)
  print("\n" + table)
  for g in growth:
    print(f"ring: {g['bytes_per_token'] / 1024:.1f} KiB per token from {g['from']} to {g['to']}")
  if verdict["slope_ratio"] is not None:
    print(f"per-token growth, last doubling / first: {verdict['slope_ratio']:.2f} (linear 1, "
          f"quadratic 2 per doubling): {'linear' if verdict['linear'] else 'NOT linear'}")
  stamp = datetime.date.today().isoformat()
  out = args.out or os.path.join("bench", "results", f"memory-{stamp}-{socket.gethostname()}"
                                 f"{'-quick' if args.quick else ''}.json")
  png = args.plot or os.path.splitext(out)[0] + ".png"
  os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
  plot(rows, png)
  write_json(out, {"benchmark": "memory", "machine": machine(), "args": vars(args),
                   "rows": rows, "growth": growth, **verdict, "table": table,
                   "plot": png})
  return 0


if __name__ == "__main__":
  sys.exit(main())
