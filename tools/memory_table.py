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
  With --longest, the longest row that fits, in powers of two times the longest of
  --tokens (the ring then spans the whole slice).
- serving (--serve): the longest prompt one request may have, in powers of two times
  32K, and the most requests of 32K tokens, on the mesh serve.py chooses; bf16 weights.

A "longest" or "most" is searched, not extrapolated: the first two sizes give a line of
bytes per chip against the size, the line's guess is compiled, then doubled (or halved)
until a size that fits is next to one that does not. Both are compiled cells in the
table; the line only saves the compiles in between (the bytes are not linear in every
case: in the model's depth they are not).

Prints a Markdown table; writes every cell's JSON to --output. The cells already in
--output are kept, and one asked for again (the same tools.aot arguments; not one that
ended in an error) is not compiled again: a grid too long for one sitting is run in
parts, each adding to the file.
"""

import itertools
import json
import math
import os
import re
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


# tools.aot arguments (json.dumps of the list) -> the cell compiled from them earlier
COMPILED: dict[str, dict] = {}


def run_aot(model: str, slice_name: str, overrides: dict, serve: dict | None = None) -> dict:
  """One tools.aot run; its JSON line (plus "argv", "seconds"), or {"error": ...}."""
  args = [sys.executable, "-m", "tools.aot", f"--config=configs/{model}.py:v5p-128",
          f"--topology={slice_name}"]
  args += [f"--config.{key}={value}" for key, value in overrides.items()]
  if serve is not None:
    args += ["--serve"] + [f"--{key}={value}" for key, value in serve.items()]
  earlier = COMPILED.get(json.dumps(args[2:]))
  if earlier is not None:
    return {k: v for k, v in earlier.items()
            if k not in ("kind", "model", "slice", "tokens", "rows", "mesh")}
  start = time.perf_counter()
  done = subprocess.run(args, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  last = done.stdout.strip().splitlines()[-1:] or [""]
  try:
    result = json.loads(last[0])
  except json.JSONDecodeError:
    return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1], "argv": args[2:]}
  cell = dict(result, argv=args[2:], seconds=round(seconds, 1))
  COMPILED[json.dumps(cell["argv"])] = cell
  return cell


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


def largest_fitting(cell_at, start: int, limit: int) -> int | None:
  """The largest start * 2**k <= limit whose cell fits (None if start does not), with
  the compiled cell next to it that does not fit (unless limit is reached).

  Args:
    cell_at: size -> the compiled cell (asked for the same size more than once).
  """
  if not fits(cell_at(start)):
    return None
  if 2 * start > limit or not fits(cell_at(2 * start)):
    return start
  worst = [max(p["per_device"]["total"] for p in cell_at(n)["programs"])
           for n in (start, 2 * start)]
  hbm = min(p["hbm_bytes"] for p in cell_at(start)["programs"])
  slope = (worst[1] - worst[0]) / start
  size = 2 * start
  while slope > 0 and 2 * size <= limit and worst[0] + slope * (2 * size - start) <= hbm:
    size *= 2
  while size > 2 * start and not fits(cell_at(size)):
    size //= 2
  while 2 * size <= limit and fits(cell_at(2 * size)):
    size *= 2
  return size


def total(cell: dict) -> str:
  if "error" in cell:
    return f"error: {cell['error'][:80]}"
  refused = [p["error"] for p in cell["programs"] if "per_device" not in p]
  if refused:  # XLA's refusal: "... temporaries (145.89G) exceeds available HBM (95.74G)."
    needed = re.search(r"\(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", refused[0])
    return (f"XLA: {needed[1]} of temporaries, {needed[2]} available" if needed else
            f"XLA: {refused[0][:80]}")
  worst = max(cell["programs"], key=lambda p: p["per_device"]["total"])
  used = worst["per_device"]["total"]
  return f"{used / GIB:.1f} GiB ({100 * used / worst['hbm_bytes']:.0f}%)"


def main(argv):
  del argv
  cli.start()
  cells = []
  if FLAGS.output and os.path.exists(FLAGS.output):  # kept, and not compiled again
    with open(FLAGS.output) as f:
      cells = [cell for cell in json.load(f) if "error" not in cell]
    COMPILED.update((json.dumps(cell["argv"]), cell) for cell in cells)

  def record(cell):
    if any(cell["argv"] == other["argv"] for other in cells):
      return cell  # the same compile under another series (32K x 1 row)
    cells.append(cell)
    print(json.dumps({k: v for k, v in cell.items() if k != "argv"}), file=sys.stderr,
          flush=True)
    if FLAGS.output:
      os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
      with open(FLAGS.output, "w") as f:
        json.dump(cells, f, indent=1)
    return cell

  # (run_aot compiles each argument list once and `record` keeps each cell once, so a
  # search may ask for the same size again)
  for model in FLAGS.models:
    for slice_name in FLAGS.slices:
      train_at = lambda tokens: record(train_cell(model, slice_name, tokens))
      lengths = [int(t) for t in FLAGS.tokens]
      for tokens in lengths:
        train_at(tokens)
      if FLAGS.longest and lengths:
        largest_fitting(train_at, max(lengths), 1 << 26)
      if FLAGS.serve:
        largest_fitting(lambda prompt: record(serve_cell(model, slice_name, prompt, 1)),
                        32768, 1 << 24)
        largest_fitting(lambda rows: record(serve_cell(model, slice_name, 32768, rows)),
                        1, 1024)

  print(markdown(cells))


def markdown(cells: list) -> str:
  """The table of `cells` (as --output holds them), by model, slice, kind and size."""
  order = lambda c: (c["model"], c["slice"], c["kind"], c.get("rows", 0), c["tokens"])
  lines = ["| model | slice | kind | tokens per row | rows | mesh | per chip (of HBM) | fits |",
           "|---|---|---|---|---|---|---|---|"]
  for cell in sorted(cells, key=order):
    mesh = cell.get("mesh")
    mesh = f"fsdp {mesh['fsdp']} x sequence {mesh['sequence']}" if mesh else "serve.py's"
    rows = cell["mesh"]["rows"] if cell["kind"] == "train" else cell["rows"]
    lines.append(f"| {cell['model']} | {cell['slice']} | {cell['kind']} | {cell['tokens']:,} | "
                 f"{rows} | {mesh} | {total(cell)} | {'yes' if fits(cell) else 'no'} |")
  return "\n".join(lines)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
