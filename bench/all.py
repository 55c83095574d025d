"""Every benchmark in one command, one JSON and one table (`make bench`).

  python -m bench.all            # attention, training, decoding, memory (~25 min on 2 cores)
  python -m bench.all --quick    # the same code at smoke sizes (~3 min; tests/test_bench.py)

Runs, each as its own process (its output streams to the console):
  bench.attention  causal fwd+bwd at 8K/16K/32K on 8 devices: ringlm vs the
                   `ringattention` package vs one-device XLA attention
  bench.train      `tiny` tokens/s and MFU at seq_len 2048 and 8192
  bench.decode     serve.py vs transformers generate end to end; a 16K-token prefill
  bench.memory     peak memory of a `tiny` training step at 2K-64K tokens: ring vs full
Then writes bench/results/<date>-<machine>.json (every benchmark's JSON under its
name, plus the summary rows) and .md (the machine and the table), and, unless
--quick, puts that table into README.md between its "bench:begin/end" markers.
Ratios compare against the peer measured in the same run; "% of peak" is of the
matmul peak each benchmark measured in its own process.
"""

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"

FULL = {
    "attention": ["--lengths=8192,16384,32768", "--shapes=8x64", "--repeats=2"],
    "train": [],
    "decode": [],
    "memory": [],
}
QUICK = {
    "attention": ["--quick", "--shapes=8x64"],
    "train": ["--quick"],
    "decode": ["--quick"],
    "memory": ["--quick"],
}


def run_benchmarks(options: dict, directory: str, memory_plot: str) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  results = {}
  for name, args in options.items():
    out = os.path.join(directory, f"{name}.json")
    if name == "memory":
      args = [*args, f"--plot={memory_plot}"]
    print(f"\n=== bench.{name} {' '.join(args)}", flush=True)
    status = subprocess.run([sys.executable, "-m", f"bench.{name}", *args, f"--out={out}"],
                            cwd=ROOT, env=env).returncode
    if status != 0:
      raise SystemExit(f"bench.{name} failed (exit {status}); see its output above")
    with open(out) as f:
      results[name] = json.load(f)
  return results


def _gib(x) -> str:
  return f"{x / 2**30:.2f} GiB"


def summary_rows(results: dict) -> list:
  """One row per measured case: what ringlm did, what its peer did, the ratio."""
  rows = []
  attention = results["attention"]["rows"]
  for length in sorted({r["seq_len"] for r in attention}):
    case = {r["impl"]: r for r in attention if r["seq_len"] == length}
    ours, peer, dense = case["ringlm"], case["ringattention"], case.get("xla-1dev", {})
    dense_text = (f"{dense['median_s']:.2f} s" if "median_s" in dense else
                  f"not run: {dense.get('skipped', '?')}")
    rows.append({
        "benchmark": "attention fwd+bwd", "case": f"L={length}, {ours['heads']}x{ours['head_dim']}, "
                                                  "8 devices",
        "ringlm": f"{ours['median_s']:.2f} s",
        "peer": f"ringattention {peer['median_s']:.2f} s; 1-device XLA {dense_text}",
        "ratio": peer["median_s"] / ours["median_s"],
        "percent_of_peak": ours["percent_of_peak"],
        "memory": f"{_gib(ours['planned_memory_bytes'])} (peer {_gib(peer['planned_memory_bytes'])}; "
                  f"1-device {_gib(dense['planned_memory_bytes'])})"})
  for row in results["train"]["rows"]:
    rows.append({
        "benchmark": "training step", "case": f"tiny, seq_len {row['seq_len']} x "
                                              f"{row['batch_size']}, 8 devices",
        "ringlm": f"{row['tokens_per_s']:.0f} tok/s, {row['median_step_s']:.2f} s/step",
        "peer": "", "ratio": None, "percent_of_peak": 100 * row["mfu"], "memory": ""})
  decode = results["decode"]
  runs = decode["decode"]["runs"]
  hf = runs["transformers"]
  for name in ("ringlm_warm", "ringlm_cold"):
    ours = runs[name]
    match = decode["decode"]["tokens"][name]
    rows.append({
        "benchmark": "batch decode, end to end",
        "case": f"{decode['args']['prompts']} x {decode['args']['prompt_len']} -> "
                f"{decode['args']['new_tokens']} greedy, {name.split('_')[1]} compilation cache",
        "ringlm": f"{ours['end_to_end_s']:.2f} s (decode {ours['decode_s']:.2f} s)",
        "peer": f"transformers {hf['end_to_end_s']:.2f} s (decode {hf['decode_s']:.2f} s)",
        "ratio": hf["end_to_end_s"] / ours["end_to_end_s"],
        "percent_of_peak": ours["decode_percent_of_peak"],
        "memory": f"{_gib(ours['peak_rss_bytes'])} (peer {_gib(hf['peak_rss_bytes'])}); "
                  f"tokens {'identical' if match['match'] else 'differ'}"})
  if "long" in decode:
    long = decode["long"]["rows"]
    ours, hf = long["ringlm"], long.get("transformers", {})
    hf_text = f"transformers {hf['prefill_s']:.2f} s" if "prefill_s" in hf else "transformers not run"
    rows.append({
        "benchmark": "prefill", "case": f"{decode['long']['prompt_len']}-token prompt, "
                                        "ringlm on 8 devices (sequence)",
        "ringlm": f"{ours['prefill_s']:.2f} s", "peer": hf_text,
        "ratio": hf["prefill_s"] / ours["prefill_s"] if "prefill_s" in hf else None,
        "percent_of_peak": ours["prefill_percent_of_peak"],
        "memory": f"{_gib(ours['peak_rss_bytes'])}" + (f" (peer {_gib(hf['peak_rss_bytes'])})"
                                                       if "peak_rss_bytes" in hf else "")})
  memory = results["memory"]
  for length in sorted({r["length"] for r in memory["rows"]}):
    case = {r["attention"]: r for r in memory["rows"] if r["length"] == length}
    ring, full = case["ring"], case["full"]
    full_text = (_gib(full["peak_rss_bytes"]) + " peak RSS" if "peak_rss_bytes" in full else
                 f"not run: XLA plans {_gib(full['planned_bytes'])}" if "planned_bytes" in full
                 else full.get("failed", "?"))
    rows.append({
        "benchmark": "memory of a training step", "case": f"tiny, {length} tokens",
        "ringlm": (_gib(ring["peak_rss_bytes"]) + " peak RSS (8 devices)"
                   if "peak_rss_bytes" in ring else f"failed: {ring.get('failed', '?')}"),
        "peer": f"full attention, 1 device: {full_text}",
        "ratio": (full["peak_rss_bytes"] / ring["peak_rss_bytes"]
                  if "peak_rss_bytes" in full and "peak_rss_bytes" in ring else None),
        "percent_of_peak": None,
        "memory": f"XLA plans {_gib(ring['planned_bytes'])}" if "planned_bytes" in ring else ""})
  return rows


def format_markdown(results: dict, rows: list) -> str:
  machine = results["attention"]["machine"]
  peaks = ", ".join(f"{name} {results[name]['matmul']['peak_flops'] / 1e9:.0f}"
                    for name in ("attention", "train", "decode") if "matmul" in results[name])
  lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} "
           f"({machine['backend']}). Matmul peak measured in each benchmark's process "
           f"(GFLOP/s): {peaks}.", "",
           "| benchmark | case | ringlm | peer | peer / ringlm | ringlm % of peak | memory |",
           "|---|---|---|---|---|---|---|"]
  for row in rows:
    ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else ""
    percent = f"{row['percent_of_peak']:.0f}%" if row["percent_of_peak"] is not None else ""
    lines.append(f"| {row['benchmark']} | {row['case']} | {row['ringlm']} | {row['peer']} | "
                 f"{ratio} | {percent} | {row['memory']} |")
  from bench.memory import linearity
  growth = results["memory"]["growth"]
  verdict = linearity(growth)
  steps = "; ".join(f"{g['from']}->{g['to']}: {g['bytes_per_token'] / 1024:.0f} KiB"
                    for g in growth)
  if verdict["slope_ratio"] is not None:
    lines += ["", f"Ring peak RSS added per token ({steps}): the last doubling adds "
                  f"{verdict['slope_ratio']:.2f}x the first's per token (linear: 1x; a quadratic "
                  f"term: 2x per doubling) - {'linear' if verdict['linear'] else 'NOT linear'}."]
  return "\n".join(lines)


def update_readme(table: str, json_path: str) -> bool:
  path = os.path.join(ROOT, "README.md")
  with open(path) as f:
    text = f.read()
  if README_BEGIN not in text or README_END not in text:
    return False
  head, rest = text.split(README_BEGIN, 1)
  _, tail = rest.split(README_END, 1)
  stem = os.path.splitext(os.path.relpath(json_path, ROOT))[0]
  body = (f"\n{table}\n\n![memory of a training step vs context]({stem}-memory.png)\n\n"
          f"(`make bench`; JSON: `{stem}.json`)\n")
  with open(path, "w") as f:
    f.write(head + README_BEGIN + body + README_END + tail)
  return True


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="smoke sizes, no README update")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
  parser.add_argument("--render", default=None, metavar="JSON",
                      help="no runs: rebuild the table (and README) from this earlier JSON")
  args = parser.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      saved = json.load(f)
    args.quick, args.out, results = saved["quick"], args.render, saved["results"]
    return _report(results, args)
  stamp = datetime.date.today().isoformat()
  out = args.out or os.path.join(ROOT, "bench", "results", f"{stamp}-{socket.gethostname()}"
                                 f"{'-quick' if args.quick else ''}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with tempfile.TemporaryDirectory() as directory:
    results = run_benchmarks(QUICK if args.quick else FULL, directory,
                             os.path.splitext(out)[0] + "-memory.png")
  args.out = out
  return _report(results, args)


def _report(results: dict, args) -> int:
  """Summary rows, table, JSON + markdown next to args.out, README (unless quick)."""
  out = args.out
  rows = summary_rows(results)
  table = format_markdown(results, rows)
  print("\n" + table)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"benchmark": "all", "quick": args.quick, "rows": rows, "table": table,
               "results": results}, f, indent=2)
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(table + "\n")
  print(f"wrote {out} and {os.path.splitext(out)[0]}.md")
  if not args.quick and update_readme(table, out):
    print("updated README.md (Performance)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
