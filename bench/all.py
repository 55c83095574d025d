"""Every benchmark in one command, one JSON and one set of tables (`make bench`).

  python -m bench.all            # attention, training, decoding, memory (~25 min on 2 cores)
  python -m bench.all --quick    # the same code at smoke sizes (~3 min; tests/test_bench.py)
  python -m bench.all --render=bench/results/2026-11-26-vm.json   # no runs: rewrite the
                                 # docs and README tables from an earlier run's JSON

Runs, each as its own process (its output streams to the console):
  bench.attention  causal fwd+bwd at 8K/16K/32K on 8 devices: ringlm vs the
                   `ringattention` package vs one-device XLA attention
  bench.train      `tiny` tokens/s and MFU at seq_len 2048 and 8192
  bench.decode     serve.py vs transformers generate end to end; a 16K-token prefill
  bench.memory     peak memory of a `tiny` training step at 2K-64K tokens: ring vs full
Then writes bench/results/<date>-<machine>.json (every benchmark's JSON under its
name, plus the summary rows) and .md (the machine and the summary table), and, unless
--quick, rewrites two marked blocks ("bench:begin/end"): in docs/benchmarks.md the
summary table and every benchmark's full table; in README.md a short table, one row
per benchmark, that links to docs/benchmarks.md.
Ratios compare against the peer measured in the same run; "% of peak" is of the
matmul peak each benchmark measured in its own process.
"""

import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")  # the full tables

FULL = {
    "attention": ["--lengths=8192,16384,32768", "--shapes=8x64", "--repeats=2",
                  "--window=4096"],
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
# The heading of each benchmark's own table in docs/benchmarks.md.
TITLES = {
    "attention": "Attention forward + backward (`python -m bench.attention`)",
    "train": "Training step of `tiny` (`python -m bench.train`)",
    "decode": "Batch decoding and a long prefill against transformers (`python -m bench.decode`)",
    "memory": "Memory of a training step against context (`python -m bench.memory`)",
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
  # (runs saved before 2026-12-06 had one transformers side, in fp32)
  hf = runs.get("transformers_bf16", runs.get("transformers"))
  for name in [n for n in runs if n.startswith("ringlm_")]:
    ours = runs[name]
    match = decode["decode"]["tokens"][name]
    variant, when = (name[len("ringlm_"):].rsplit("_", 1) if name.count("_") > 1
                     else ("fp32", name[len("ringlm_"):]))
    rows.append({
        "benchmark": "batch decode, end to end",
        "case": f"{decode['args']['prompts']} x {decode['args']['prompt_len']} -> "
                f"{decode['args']['new_tokens']} greedy, ringlm {variant}, {when} compilation "
                "cache",
        "ringlm": f"{ours['end_to_end_s']:.2f} s (decode {ours['decode_s']:.2f} s)",
        "peer": f"{hf['name'].replace('_', ' ')} {hf['end_to_end_s']:.2f} s "
                f"(decode {hf['decode_s']:.2f} s)",
        "ratio": hf["end_to_end_s"] / ours["end_to_end_s"],
        "percent_of_peak": ours["decode_percent_of_peak"],
        "memory": f"{_gib(ours['peak_rss_bytes'])} (peer {_gib(hf['peak_rss_bytes'])}); "
                  f"{ours.get('decode_percent_of_roofline', 0):.0f}% of the memory roofline; "
                  f"{100 * match.get('agreement', float(match['match'])):.0f}% of tokens as "
                  "transformers fp32"})
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


def _machine_line(results: dict) -> str:
  machine = results["attention"]["machine"]
  def peak(matmul):  # decode's since 2026-12-06: one per compute dtype
    if "peak_flops" in matmul:
      return f"{matmul['peak_flops'] / 1e9:.0f}"
    return " / ".join(f"{m['peak_flops'] / 1e9:.0f} ({dtype})" for dtype, m in matmul.items())
  peaks = ", ".join(f"{name} {peak(results[name]['matmul'])}"
                    for name in ("attention", "train", "decode") if "matmul" in results[name])
  features = ", ".join(machine.get("cpu_features", [])) or "not recorded"
  return (f"Machine: {machine['cpu']} ({features}), {machine['cores']} cores, "
          f"jax {machine['jax']} "
          f"({machine['backend']}). Matmul peak measured in each benchmark's process "
          f"(GFLOP/s): {peaks}.")


def _memory_verdict(results: dict) -> str:
  """One sentence on how the ring's peak RSS grows with context ("" if too few lengths)."""
  from bench.memory import linearity
  growth = results["memory"]["growth"]
  verdict = linearity(growth)
  if verdict["slope_ratio"] is None:
    return ""
  steps = "; ".join(f"{g['from']}->{g['to']}: {g['bytes_per_token'] / 1024:.0f} KiB"
                    for g in growth)
  return (f"Ring peak RSS added per token ({steps}): the last doubling adds "
          f"{verdict['slope_ratio']:.2f}x the first's per token (linear: 1x; a quadratic "
          f"term: 2x per doubling) - {'linear' if verdict['linear'] else 'NOT linear'}.")


def format_markdown(results: dict, rows: list) -> str:
  """The machine, the summary table (every row of `summary_rows`), the memory verdict."""
  lines = [_machine_line(results), "",
           "| benchmark | case | ringlm | peer | peer / ringlm | ringlm % of peak | memory |",
           "|---|---|---|---|---|---|---|"]
  for row in rows:
    ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else ""
    percent = f"{row['percent_of_peak']:.0f}%" if row["percent_of_peak"] is not None else ""
    lines.append(f"| {row['benchmark']} | {row['case']} | {row['ringlm']} | {row['peer']} | "
                 f"{ratio} | {percent} | {row['memory']} |")
  verdict = _memory_verdict(results)
  if verdict:
    lines += ["", verdict]
  return "\n".join(lines)


def headline_rows(results: dict) -> list:
  """One row per benchmark, already formatted: what the README shows."""
  rows = []
  attention = results["attention"]["rows"]
  both = [length for length in {r["seq_len"] for r in attention}
          if {"ringlm", "ringattention"} <= {r["impl"] for r in attention if r["seq_len"] == length}]
  if both:
    length = max(both)
    case = {r["impl"]: r for r in attention if r["seq_len"] == length}
    ours, peer = case["ringlm"], case["ringattention"]
    rows.append({
        "benchmark": "attention fwd+bwd (causal)",
        "case": f"{length} tokens, {ours['heads']} heads x {ours['head_dim']}, ring of "
                f"{ours.get('devices', 8)} devices",
        "ringlm": f"{ours['median_s']:.2f} s", "peer": f"`ringattention` {peer['median_s']:.2f} s",
        "ratio": f"{peer['median_s'] / ours['median_s']:.2f}x",
        "peak": f"{ours['percent_of_peak']:.0f}%"})
  windowed = [r for r in attention if "speedup_vs_full_causal" in r]
  if windowed:
    row = max(windowed, key=lambda r: r["seq_len"])
    full = next(r for r in attention if r["impl"] == "ringlm" and r["seq_len"] == row["seq_len"])
    cache = results["attention"].get("decode_cache") or {}
    memory = (f"; decode cache {cache['windowed_over_full']:.2f} of full"
              if "windowed_over_full" in cache else "")
    rows.append({
        "benchmark": f"attention fwd+bwd, sliding window {row['window']}",
        "case": f"{row['seq_len']} tokens, natural order, ring of {row.get('devices', 8)}",
        "ringlm": f"{row['median_s']:.2f} s",
        "peer": f"full causal ringlm {full['median_s']:.2f} s",
        "ratio": (f"{row['speedup_vs_full_causal']:.2f}x (FLOPs "
                  f"{row['flop_ratio_vs_full_causal']:.1f}x fewer){memory}"),
        "peak": f"{row['percent_of_peak']:.0f}%"})
  train = results["train"]["rows"]
  if train:
    mesh = train[0]["mesh"]
    mesh_text = (" x ".join(f"{axis} {size}" for axis, size in mesh.items() if size > 1)
                 if isinstance(mesh, dict) else str(mesh))
    rows.append({
        "benchmark": "training step, `tiny`",
        "case": "seq_len " + ", ".join(f"{r['seq_len']} ({r['batch_size']} rows)" for r in train)
                + f"; {mesh_text}",
        "ringlm": " / ".join(f"{r['tokens_per_s']:.0f}" for r in train) + " tok/s", "peer": "",
        "ratio": "", "peak": "MFU " + " / ".join(f"{100 * r['mfu']:.0f}%" for r in train)})
  decode = results["decode"]
  runs, args = decode["decode"]["runs"], decode["args"]
  hf, warm, cold = runs["transformers"], runs["ringlm_warm"], runs["ringlm_cold"]
  same = all(decode["decode"]["tokens"][name]["match"] for name in ("ringlm_warm", "ringlm_cold"))
  rows.append({
      "benchmark": "batch decode, end to end",
      "case": f"{args['prompts']} prompts x {args['prompt_len']} -> {args['new_tokens']} tokens, "
              f"greedy, 1 device; tokens {'identical' if same else 'DIFFER'}",
      "ringlm": f"{warm['end_to_end_s']:.2f} s warm, {cold['end_to_end_s']:.2f} s cold",
      "peer": f"transformers `generate` {hf['end_to_end_s']:.2f} s",
      "ratio": f"{hf['end_to_end_s'] / warm['end_to_end_s']:.2f}x warm, "
               f"{hf['end_to_end_s'] / cold['end_to_end_s']:.2f}x cold",
      "peak": f"{warm['decode_percent_of_peak']:.0f}%"})
  if "long" in decode:
    long = decode["long"]["rows"]
    ours, peer = long["ringlm"], long.get("transformers", {})
    rows.append({
        "benchmark": "prefill", "case": f"one {decode['long']['prompt_len']}-token prompt, "
                                        "ring of 8 devices",
        "ringlm": f"{ours['prefill_s']:.2f} s",
        "peer": f"transformers (SDPA) {peer['prefill_s']:.2f} s" if "prefill_s" in peer else "",
        "ratio": f"{peer['prefill_s'] / ours['prefill_s']:.2f}x" if "prefill_s" in peer else "",
        "peak": f"{ours['prefill_percent_of_peak']:.0f}%"})
  memory = results["memory"]["rows"]
  ring = {r["length"]: r for r in memory if r["attention"] == "ring" and "peak_rss_bytes" in r}
  full = {r["length"]: r for r in memory if r["attention"] == "full"}
  if ring:
    longest = max(ring)
    ran = [n for n in ring if "peak_rss_bytes" in full.get(n, {})]
    peer = []
    if ran:
      n = max(ran)
      peer.append(f"{_gib(full[n]['peak_rss_bytes'])} at {n}")
    if "planned_bytes" in full.get(longest, {}) and longest not in ran:
      peer.append(f"XLA would plan {_gib(full[longest]['planned_bytes'])} at {longest}")
    verdict = _memory_verdict(results)
    linear = (" (grows linearly)" if verdict.endswith("- linear.") else
              " (NOT linear)" if verdict else "")
    rows.append({
        "benchmark": "memory of a training step, `tiny`",
        "case": f"{min(r['length'] for r in memory)}-{longest} tokens; peak RSS",
        "ringlm": f"{_gib(ring[longest]['peak_rss_bytes'])} at {longest}{linear}",
        "peer": "full attention, 1 device: " + "; ".join(peer),
        "ratio": (f"{full[n]['peak_rss_bytes'] / ring[n]['peak_rss_bytes']:.2f}x at {n}"
                  if ran else ""), "peak": ""})
  return rows


def format_headline(results: dict, date: str, json_path: str) -> str:
  """The README's block: one row per benchmark and where the full tables are."""
  machine = results["attention"]["machine"]
  lines = ["| benchmark | case | ringlm | peer | peer / ringlm | ringlm % of peak |",
           "|---|---|---|---|---|---|"]
  for row in headline_rows(results):
    lines.append(f"| {row['benchmark']} | {row['case']} | {row['ringlm']} | {row['peer']} | "
                 f"{row['ratio']} | {row['peak']} |")
  lines += ["", f"Run of {date} on {machine['cpu']}, {machine['cores']} cores, jax "
                f"{machine['jax']}: `make bench`, JSON `{_rel(json_path, ROOT)}`. Every case, "
                "every benchmark's full table and how to read them: "
                "[docs/benchmarks.md](docs/benchmarks.md)."]
  return "\n".join(lines)


def _paragraphs(text: str) -> str:
  """A benchmark's printed table as markdown: each line of prose its own paragraph, one
  blank line between blocks."""
  prose = lambda line: not line.lstrip().startswith("|")
  out = []
  for line in text.strip().splitlines():
    if not line.strip():
      if out and out[-1]:
        out.append("")
      continue
    if out and out[-1] and (prose(line) or prose(out[-1])):
      out.append("")
    out.append(line)
  return "\n".join(out)


def format_full(results: dict, summary: str, date: str, json_path: str) -> str:
  """docs/benchmarks.md's block: the summary table, then every benchmark's own table."""
  lines = [f"Run of {date} (`make bench`; JSON: `{_rel(json_path, ROOT)}`).", "", summary]
  for name in ("attention", "train", "decode", "memory"):
    table = results.get(name, {}).get("table")
    if table:
      lines += ["", f"### {TITLES[name]}", "", _paragraphs(table)]
    if name == "memory":
      plot = os.path.splitext(json_path)[0] + "-memory.png"
      if os.path.exists(plot):
        lines += ["", f"![memory of a training step against context]"
                      f"({_rel(plot, os.path.dirname(DOCS))})"]
  return "\n".join(lines)


def _rel(path: str, start: str) -> str:
  return os.path.relpath(os.path.abspath(path), start).replace(os.sep, "/")


def update_marked(path: str, body: str) -> bool:
  """Replaces what lies between the bench markers of `path`; False if it has none."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    text = f.read()
  if README_BEGIN not in text or README_END not in text:
    return False
  head, rest = text.split(README_BEGIN, 1)
  _, tail = rest.split(README_END, 1)
  with open(path, "w") as f:
    f.write(head + README_BEGIN + "\n" + body + "\n" + README_END + tail)
  return True


def _date(json_path: str, saved: dict | None = None) -> str:
  """The run's date: stored in its JSON, else the date its file name starts with, else today."""
  if saved and saved.get("date"):
    return saved["date"]
  match = re.match(r"\d{4}-\d{2}-\d{2}", os.path.basename(json_path))
  return match.group(0) if match else datetime.date.today().isoformat()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="smoke sizes, no docs/README update")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
  parser.add_argument("--render", default=None, metavar="JSON",
                      help="no runs: rewrite docs/benchmarks.md and the README table from this "
                           "earlier run's JSON (which is left as it is)")
  args = parser.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      saved = json.load(f)
    return _report(saved["results"], args.render, quick=saved["quick"],
                   date=_date(args.render, saved), write_results=False)
  stamp = datetime.date.today().isoformat()
  out = args.out or os.path.join(ROOT, "bench", "results", f"{stamp}-{socket.gethostname()}"
                                 f"{'-quick' if args.quick else ''}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with tempfile.TemporaryDirectory() as directory:
    results = run_benchmarks(QUICK if args.quick else FULL, directory,
                             os.path.splitext(out)[0] + "-memory.png")
  return _report(results, out, quick=args.quick, date=stamp, write_results=True)


def _report(results: dict, out: str, *, quick: bool, date: str, write_results: bool) -> int:
  """Summary rows and table; the JSON + markdown next to `out` (a fresh run); unless
  quick, the full tables into docs/benchmarks.md and one row per benchmark into README."""
  rows = summary_rows(results)
  table = format_markdown(results, rows)
  print("\n" + table)
  if write_results:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump({"benchmark": "all", "quick": quick, "date": date, "rows": rows, "table": table,
                 "results": results}, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
      f.write(table + "\n")
    print(f"wrote {out} and {os.path.splitext(out)[0]}.md")
  if quick:
    return 0
  if update_marked(DOCS, format_full(results, table, date, out)):
    print(f"updated {_rel(DOCS, ROOT)} (every table)")
  else:
    print(f"{_rel(DOCS, ROOT)} has no bench markers; not updated")
  if update_marked(README, format_headline(results, date, out)):
    print("updated README.md (Performance: one row per benchmark)")
  else:
    print("README.md has no bench markers; not updated")
  return 0


if __name__ == "__main__":
  sys.exit(main())
