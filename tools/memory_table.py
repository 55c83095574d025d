"""The long-context memory table: what fits on which TPU slice, from the TPU compiler.

  python -m tools.memory_table [--models=llama2_7b,llama3_8b] [--slices=v5p-128,v5e-256]
      [--tokens=32768,131072,524288,1048576] [--longest] [--serve]
      [--output=docs/tpu-memory.json]

Each cell is one `python -m tools.aot` run (a separate process) of `configs/MODEL.py`
with the mesh, row length and rows of the cell:

- training (`train step`): the ring (mesh.sequence) is the shortest that a product of
  whole physical axes of the slice allows with at most --tokens_per_device tokens per
  device; every other device goes to mesh.fsdp, one row per fsdp group (so a step is
  fsdp rows); model.head_chunk, train.shard_state_over_sequence and
  model.gather_in_compute_dtype as the real-size configs set them
  (configs/base.long_context_levers).
  With --longest, rows twice as long as the longest in --tokens follow until one does
  not fit (the ring then spans the whole slice).
- serving (--serve): the longest prompt one request may have, by doubling from 32K,
  and the most requests of 32K tokens, on the mesh serve.py chooses; bf16 weights.

Prints a Markdown table; writes every cell's JSON to --output.
"""

import itertools
import json
import math
import os
import subprocess
import sys
import time

from absl import app, flags

import cli

FLAGS = flags.FLAGS
GIB = 2**30


def define_flags():
  flags.DEFINE_list("models", ["llama2_7b", "llama3_8b"], "Config files under configs/.")
  flags.DEFINE_list("slices", ["v5p-128", "v5e-256", "v6e-256"], "TPU slices.")
  flags.DEFINE_list("tokens", ["32768", "131072", "524288", "1048576"], "Tokens per row.")
  flags.DEFINE_integer("tokens_per_device", 16384, "Training: the ring grows until a "
                       "device holds at most this many tokens of a row (or spans the slice).")
  flags.DEFINE_bool("longest", False, "Training: double the row until it does not fit.")
  flags.DEFINE_bool("serve", False, "Also the serving cells: longest prompt, most rows at 32K.")
  flags.DEFINE_string("output", None, "JSON file for every cell.")
  cli.define_flags()


def ring_sizes(slice_name: str) -> list[int]:
  """Mesh axis sizes that are products of whole physical axes of the slice."""
  from parallel import topology
  dims = [int(n) for n in topology.topology_name(slice_name).split(":")[1].split("x")]
  return sorted({math.prod(c) for r in range(len(dims) + 1)
                 for c in itertools.combinations(dims, r)})


def training_mesh(slice_name: str, tokens: int, per_device: int) -> dict:
  """{"fsdp", "sequence", "rows"} of a training cell (the rule in the module docstring)."""
  from parallel import topology
  chips = topology.chips(slice_name)
  sizes = ring_sizes(slice_name)
  ring = next((s for s in sizes if tokens // s <= per_device), sizes[-1])
  return {"sequence": ring, "fsdp": chips // ring, "rows": chips // ring}


def run_aot(model: str, slice_name: str, overrides: dict, serve: dict | None = None) -> dict:
  """One tools.aot run; its JSON line (plus "argv", "seconds"), or {"error": ...}."""
  args = [sys.executable, "-m", "tools.aot", f"--config=configs/{model}.py:v5p-128",
          f"--topology={slice_name}"]
  args += [f"--config.{key}={value}" for key, value in overrides.items()]
  if serve is not None:
    args += ["--serve"] + [f"--{key}={value}" for key, value in serve.items()]
  start = time.perf_counter()
  done = subprocess.run(args, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  last = done.stdout.strip().splitlines()[-1:] or [""]
  try:
    result = json.loads(last[0])
  except json.JSONDecodeError:
    return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1], "argv": args[2:]}
  return dict(result, argv=args[2:], seconds=round(seconds, 1))


def train_cell(model, slice_name, tokens) -> dict:
  from configs import base
  mesh = training_mesh(slice_name, tokens, FLAGS.tokens_per_device)
  overrides = {"mesh.data": 1, "mesh.tensor": 1, "mesh.fsdp": mesh["fsdp"],
               "mesh.sequence": mesh["sequence"], "data.seq_len": tokens,
               "data.batch_size": mesh["rows"], "model.max_seq_len": tokens,
               **base.long_context_levers(mesh, tokens)}
  result = run_aot(model, slice_name, overrides)
  return dict(result, kind="train", model=model, slice=slice_name, tokens=tokens, mesh=mesh)


def serve_cell(model, slice_name, prompt, rows) -> dict:
  overrides = {"model.param_dtype": "bfloat16", "model.max_seq_len": prompt + 256}
  result = run_aot(model, slice_name, overrides,
                   serve={"prompt_tokens": prompt, "rows": rows, "max_tokens": 256})
  return dict(result, kind="serve", model=model, slice=slice_name, tokens=prompt, rows=rows)


def fits(cell: dict) -> bool:
  return "error" not in cell and all(p["fits"] for p in cell["programs"])


def total(cell: dict) -> str:
  if "error" in cell:
    return f"error: {cell['error'][:80]}"
  worst = max(cell["programs"], key=lambda p: p["per_device"]["total"])
  used = worst["per_device"]["total"]
  return f"{used / GIB:.1f} GiB ({100 * used / worst['hbm_bytes']:.0f}%)"


def main(argv):
  del argv
  cli.start()
  cells = []

  def record(cell):
    cells.append(cell)
    print(json.dumps({k: v for k, v in cell.items() if k != "argv"}), file=sys.stderr,
          flush=True)
    if FLAGS.output:
      os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
      with open(FLAGS.output, "w") as f:
        json.dump(cells, f, indent=1)
    return cell

  for model in FLAGS.models:
    for slice_name in FLAGS.slices:
      lengths = [int(t) for t in FLAGS.tokens]
      for tokens in lengths:
        record(train_cell(model, slice_name, tokens))
      if FLAGS.longest:
        tokens = max(lengths)
        while fits(cells[-1]) and tokens < (1 << 26):
          tokens *= 2
          record(train_cell(model, slice_name, tokens))
      if FLAGS.serve:
        first = record(serve_cell(model, slice_name, 32768, 1))
        prompt = 32768
        while fits(cells[-1]) and prompt < (1 << 24):
          prompt *= 2
          record(serve_cell(model, slice_name, prompt, 1))
        rows, last = 1, first
        while fits(last) and rows < 1024:
          rows *= 2
          last = record(serve_cell(model, slice_name, 32768, rows))

  print("| model | slice | kind | tokens per row | rows | mesh | per chip (of HBM) | fits |")
  print("|---|---|---|---|---|---|---|---|")
  for cell in cells:
    mesh = cell.get("mesh")
    mesh = f"fsdp {mesh['fsdp']} x sequence {mesh['sequence']}" if mesh else "serve.py's"
    rows = cell["mesh"]["rows"] if cell["kind"] == "train" else cell["rows"]
    print(f"| {cell['model']} | {cell['slice']} | {cell['kind']} | {cell['tokens']:,} | "
          f"{rows} | {mesh} | {total(cell)} | {'yes' if fits(cell) else 'no'} |")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
