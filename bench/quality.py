"""What each serving precision costs in quality: held-out perplexity of a trained model in
fp32, bf16, int8 and int4 weights (rounded to nearest, GPTQ, AWQ), an int8 or float8 KV
cache, and int8 weights with an int8 cache, through the serving path.

  python -m bench.quality                       # trains configs/tiny.py first (~5 min)
  python -m bench.quality --checkpoint=RUN_DIR  # or any checkpoint with held-out data
  python -m bench.quality --quick               # 20 training steps, fewer tokens

Every precision runs `python -m tools.eval_ppl --through_cache` with serve.py's flags, so
the second half of every window is scored token by token over the KV cache, as decode
reads it (a quantized cache's rounding included); GPTQ and AWQ rows evaluate the
checkpoint tools.quantize wrote. Targets (issue 18): bf16 within 1% of fp32, int8 weights
within 2% (each method), the int8 and float8 caches within 1%; int4 is reported against
round to nearest. Prints a table and writes JSON.
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
BF16 = "--config.serve.dtype=bfloat16"
INT8, INT4 = "--config.serve.quantize=int8", "--config.serve.quantize=int4"
# name: (eval_ppl flags, allowed perplexity change against fp32 in %, tools.quantize flags:
# a checkpoint quantized first and evaluated instead of the float one, or None)
PRECISIONS = {
    "fp32": (["--config.serve.dtype=float32"], None, None),
    "bf16": ([BF16], 1.0, None),
    "int8 weights": ([BF16, INT8], 2.0, None),
    "int8 weights, GPTQ": ([BF16], 2.0, [INT8, "--method=gptq"]),
    "int8 weights, AWQ": ([BF16], 2.0, [INT8, "--method=awq"]),
    "int4 weights": ([BF16, INT4], None, None),
    "int4 weights, GPTQ": ([BF16], None, [INT4, "--method=gptq"]),
    "int4 weights, AWQ": ([BF16], None, [INT4, "--method=awq"]),
    "int8 cache": ([BF16, "--config.model.kv_cache_dtype=int8"], 1.0, None),
    "float8 cache": ([BF16, "--config.model.kv_cache_dtype=float8_e4m3fn"], 1.0, None),
    "int8 weights + cache": ([BF16, INT8, "--config.model.kv_cache_dtype=int8"], None, None),
}


def _run(command):
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
  if result.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
  return result.stdout


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default="", help="a trained run (default: train tiny)")
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--max_tokens", type=int, default=40_000)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
  args = parser.parse_args(argv)
  if args.quick:
    args.max_tokens = 4_000
  with tempfile.TemporaryDirectory(prefix="bench-quality-") as workdir:
    checkpoint = args.checkpoint
    if not checkpoint:
      checkpoint = os.path.join(workdir, "tiny")
      steps = 20 if args.quick else 150
      print(f"training configs/tiny.py for {steps} steps", flush=True)
      _run([sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={checkpoint}",
            f"--config.train.steps={steps}"])
    rows = []
    for name, (flags, allowed, quantize) in PRECISIONS.items():
      evaluated = checkpoint
      if quantize:
        evaluated = os.path.join(workdir, name.replace(" ", "-").replace(",", ""))
        _run([sys.executable, "-m", "tools.quantize", f"--checkpoint={checkpoint}",
              f"--out={evaluated}", "--cpu_devices=1", *quantize])
        flags = flags + [f"(tools.quantize {' '.join(quantize)})"]
      out = _run([sys.executable, "-m", "tools.eval_ppl", f"--checkpoint={evaluated}",
                  f"--seq_len={args.seq_len}", f"--max_tokens={args.max_tokens}",
                  "--through_cache", "--cpu_devices=1",
                  f"--plot={os.path.join(workdir, 'ppl.png')}",
                  *[flag for flag in flags if flag.startswith("--")]])
      (result,) = json.loads(out.strip().splitlines()[-1])["results"]
      rows.append({"precision": name, "flags": flags, "ppl": result["ppl"],
                   "tokens": result["tokens"], "allowed_percent": allowed})
      print(f"  {name:<22} ppl {result['ppl']:.4f}", flush=True)
  reference = rows[0]["ppl"]
  for row in rows:
    row["change_percent"] = 100 * (row["ppl"] / reference - 1)
    row["met"] = (None if row["allowed_percent"] is None
                  else abs(row["change_percent"]) <= row["allowed_percent"])
  lines = [f"held-out perplexity at {args.seq_len} tokens, second half of each window through "
           f"the KV cache ({rows[0]['tokens']} tokens)", "",
           "| precision | perplexity | vs fp32 | target |", "|---|---|---|---|"]
  for row in rows:
    target = "" if row["allowed_percent"] is None else \
        f"within {row['allowed_percent']:.0f}%: {'met' if row['met'] else 'NOT met'}"
    lines.append(f"| {row['precision']} | {row['ppl']:.4f} | {row['change_percent']:+.2f}% | "
                 f"{target} |")
  table = "\n".join(lines)
  print("\n" + table)
  stamp = datetime.date.today().isoformat()
  path = args.out or os.path.join(ROOT, "bench", "results", f"quality-{stamp}-"
                                  f"{socket.gethostname()}{'-quick' if args.quick else ''}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"benchmark": "quality", "args": vars(args), "rows": rows, "table": table}, f,
              indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(main())
