"""Passkey retrieval over a grid of prompt lengths x key depths.

  python -m tools.eval_passkey --checkpoint=DIR --lengths=256,512,1024 \\
      [--depths=0,0.25,0.5,0.75,1] [--trials=10] [--config.model.rope.scaling...]

The Landmark / Position Interpolation template (data/passkey.py): filler, "The pass
key is NNNNN. Remember it. NNNNN is the pass key.", more filler, "What is the pass
key? The pass key is". Keys come from a fixed seed. Each prompt is exactly the given
length in tokens (the model reads the prompt and all but the last answer token).
The serving engine (serving/engine.py: prefill on the ring, KV-cache decode) generates
greedily as many tokens as the key has; a trial succeeds when they are the key.
Reports accuracy per cell and
k_max as the PI paper defines it: the largest length such that at every length up to
it accuracy is at least --threshold (20%). Writes JSON and a heatmap PNG; the last
stdout line is the JSON summary.
"""

import json
import os
import random

from absl import app, flags
from ml_collections import config_flags

import cli
from configs import base

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags, defined only when run as a program: the tools' flags share
  names (--config, --checkpoint, --cpu_devices), so importing two of them must not define any."""
  flags.DEFINE_string("checkpoint", None, "Run directory or checkpoint step.")
  flags.DEFINE_list("lengths", ["256", "512", "1024"], "Prompt lengths in tokens.")
  flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"],
                    "Depths of the key in the filler (0 = start, 1 = end).")
  flags.DEFINE_integer("trials", 10, "Keys per (length, depth) cell.")
  flags.DEFINE_integer("seed", 0, "Seed of the keys.")
  flags.DEFINE_float("threshold", 0.2, "Accuracy that counts for k_max.")
  flags.DEFINE_integer("batch_size", 8, "Prompts per forward pass.")
  flags.DEFINE_string("out", "", "JSON path (default: <run>/eval/passkey.json; the PNG "
                      "heatmap goes next to it).")
  config_flags.DEFINE_config_dict("config", base.get_config(),
                                  "Overrides of the checkpoint's config.")
  cli.define_flags(cpu_devices=None)  # as many as the mesh uses (evaluation.eval_devices)


def heatmap(cells, lengths, depths, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  grid = np.array([[cells[(length, depth)] for length in lengths] for depth in depths])
  figure, axis = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.6))
  image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  axis.set_xticks(range(len(lengths)), [str(x) for x in lengths])
  axis.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
  axis.set_xlabel("prompt length (tokens)")
  axis.set_ylabel("key depth")
  for (row, column), value in np.ndenumerate(grid):
    axis.text(column, row, f"{value:.0%}", ha="center", va="center", fontsize=8)
  axis.set_title(title, fontsize=9)
  figure.colorbar(image, ax=axis, label="accuracy")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def main(argv):
  del argv
  named = cli.start()
  import numpy as np
  from tqdm import tqdm

  from data import passkey
  from model import checkpoint as ckpt_lib
  from serving.engine import Engine
  from serving.requests import Request
  from tools import evaluation

  try:
    lengths = sorted({int(x) for x in FLAGS.lengths})
    depths = sorted({float(x) for x in FLAGS.depths})
  except ValueError:
    cli.fail("--lengths takes integers and --depths numbers in [0, 1]")
  if not all(0 <= d <= 1 for d in depths):
    cli.fail(f"--depths={','.join(FLAGS.depths)}: depths lie in [0, 1]")
  mesh, model, tokenizer, _ = evaluation.open_checkpoint(FLAGS.checkpoint, FLAGS.config,
                                                         named, lengths)
  engine = Engine(model, mesh, tokenizer=tokenizer, batch_size=FLAGS.batch_size)
  rng = random.Random(FLAGS.seed)
  keys = [passkey.random_key(rng) for _ in range(FLAGS.trials)]
  cells = {}
  for length in tqdm(lengths, desc="eval_passkey", disable=None):
    prompts = []
    try:
      for depth in depths:
        prompts += [(depth, *passkey.prompt_ids(tokenizer, key, length, depth)) for key in keys]
    except ValueError as error:
      cli.fail(str(error))
    # Greedy generation of as many tokens as the key has, through the serving engine.
    requests = [Request(line=i, id=depth, prompt_tokens=ids[:answer_start],
                              max_tokens=len(ids) - answer_start)
                for i, (depth, ids, answer_start) in enumerate(prompts)]
    results = engine.generate(requests)
    correct = {depth: 0 for depth in depths}
    for i, (depth, ids, answer_start) in enumerate(prompts):
      correct[depth] += results[i].get("tokens") == ids[answer_start:]
    for depth in depths:
      cells[(length, depth)] = correct[depth] / len(keys)
  by_length = {length: float(np.mean([cells[(length, d)] for d in depths])) for length in lengths}
  summary = {"k_max": passkey.k_max(lengths, by_length, FLAGS.threshold), "threshold": FLAGS.threshold,
             "accuracy_by_length": {str(k): v for k, v in by_length.items()},
             "cells": [{"length": length, "depth": depth, "accuracy": cells[(length, depth)]}
                       for length in lengths for depth in depths],
             "trials": len(keys), "checkpoint": FLAGS.checkpoint}
  print(f"{'depth':>6} " + " ".join(f"{length:>7}" for length in lengths))
  for depth in depths:
    print(f"{depth:>6g} " + " ".join(f"{cells[(length, depth)]:>7.0%}" for length in lengths))
  print(f"{'all':>6} " + " ".join(f"{by_length[length]:>7.0%}" for length in lengths))
  print(f"k_max = {summary['k_max']} (accuracy >= {FLAGS.threshold:.0%} at every length up to it)")
  step_dir = ckpt_lib.find_step_dir(FLAGS.checkpoint)
  out = FLAGS.out or os.path.join(ckpt_lib.run_dir(step_dir), "eval", "passkey.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(summary, f, indent=2)
  heatmap(cells, lengths, depths, os.path.splitext(out)[0] + ".png",
          f"passkey retrieval, k_max={summary['k_max']}")
  cli.summary([f"wrote {out} and {os.path.splitext(out)[0]}.png",
               f"next: python -m tools.copy_probe --checkpoint={FLAGS.checkpoint}   (can it "
               "copy from its context at all?)"])
  print(json.dumps({"k_max": summary["k_max"], "accuracy_by_length": summary["accuracy_by_length"]}))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main, flags_parser=cli.parse_flags)
