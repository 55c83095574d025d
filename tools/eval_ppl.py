"""Perplexity of any checkpoint at several context lengths, sliding window.

  python -m tools.eval_ppl --checkpoint=DIR --seq_len=256,1024 \\
      [--config.model.rope.scaling.type=linear --config.model.rope.scaling.factor=4] \\
      [--config.data.files=...] [--stride=256] [--max_tokens=100000] [--plot=ppl.png]
      [--config.serve.dtype=bfloat16] [--config.serve.quantize=int8]
      [--config.model.kv_cache_dtype=int8 --through_cache]

Held-out data: the validation split of the checkpoint's own data files (or
--config.data.files). Every length scores the same tokens: the first documents long
enough for the longest length, each in full, until --max_tokens. Within a document,
windows of L tokens move by --stride (256 as in the Position Interpolation paper,
after Press et al.); each token is scored once, in the first window that reaches it,
so it sees at least L - stride tokens of context (all of them in the first window).
The precision flags are serve.py's (evaluated in the checkpoint's own unless given);
--through_cache scores the second half of each window through the KV cache as decode
reads it (serving/scoring.CacheScorer), so that an int8 cache is measured too.
Prints a table; the last stdout line is JSON {"results": [{"seq_len", "ppl",
"tokens"}, ...]}; writes a PNG of perplexity against length.
"""

import json
import math
import os

from absl import app, flags
from ml_collections import config_flags

import cli
from configs import base

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags, defined only when run as a program: the tools' flags share
  names (--config, --checkpoint, --cpu_devices), so importing two of them must not define any."""
  flags.DEFINE_string("checkpoint", None, "Run directory or checkpoint step.")
  flags.DEFINE_list("seq_len", ["256", "1024"], "Context lengths to evaluate.")
  flags.DEFINE_integer("stride", 256, "Window stride in tokens.")
  flags.DEFINE_integer("max_tokens", 100_000, "Tokens to score (whole documents; "
                       "the default is ~20 documents of the stdlib corpus).")
  flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
  flags.DEFINE_string("plot", "", "PNG path (default: <run>/eval/ppl.png).")
  flags.DEFINE_string("label", "", "Curve label in the plot (default: the checkpoint).")
  flags.DEFINE_bool("through_cache", False, "Score the second half of every window "
                    "through the KV cache, token by token as serving decodes "
                    "(model.kv_cache_dtype's rounding included).")
  config_flags.DEFINE_config_dict("config", base.get_config(),
                                  "Overrides of the checkpoint's config.")
  cli.define_flags(cpu_devices=None)  # as many as the mesh uses (evaluation.eval_devices)


def windows(length_of_doc: int, seq_len: int, stride: int):
  """(start, first scored index) of the windows over a document's predictions."""
  starts = list(range(0, length_of_doc - seq_len + 1, stride))
  if starts[-1] + seq_len < length_of_doc:
    starts.append(length_of_doc - seq_len)
  scored_from, covered = [], 0
  for start in starts:
    scored_from.append(covered - start)  # offset inside the window
    covered = start + seq_len
  return list(zip(starts, scored_from))


def perplexity(scorer, documents, seq_len, stride, batch_size):
  """(perplexity, tokens) over tokenized documents (lists of ids, each > seq_len long)."""
  import numpy as np
  rows, masks = [], []
  for ids in documents:
    ids = np.asarray(ids, np.int32)
    for start, scored_from in windows(len(ids) - 1, seq_len, stride):
      rows.append((ids[start:start + seq_len], ids[start + 1:start + seq_len + 1]))
      mask = np.zeros(seq_len, bool)
      mask[scored_from:] = True
      masks.append(mask)
  total, count = 0.0, 0
  for begin in range(0, len(rows), batch_size):
    chunk = rows[begin:begin + batch_size]
    log_probs, _ = scorer(np.stack([r[0] for r in chunk]), np.stack([r[1] for r in chunk]))
    mask = np.stack(masks[begin:begin + batch_size])
    total -= float(log_probs[mask].astype(np.float64).sum())
    count += int(mask.sum())
  return math.exp(total / count), count


def plot(results, path, label):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axis = plt.subplots(figsize=(6, 4))
  axis.plot([r["seq_len"] for r in results], [r["ppl"] for r in results], "o-", label=label)
  axis.set_xscale("log", base=2)
  axis.set_xlabel("context length (tokens)")
  axis.set_ylabel("perplexity (held-out)")
  axis.grid(True, which="both", alpha=0.3)
  axis.legend()
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=120)
  plt.close(figure)


def main(argv):
  del argv
  named = cli.start()
  import jax
  from tqdm import tqdm

  from data import pipeline
  from model import checkpoint as ckpt_lib
  from serving.scoring import CacheScorer, Scorer
  from tools import evaluation

  config = FLAGS.config
  try:
    lengths = sorted({int(value) for value in FLAGS.seq_len})
  except ValueError:
    cli.fail(f"--seq_len={','.join(FLAGS.seq_len)}: give integers, e.g. 256,1024")
  mesh, model, tokenizer, files = evaluation.open_checkpoint(FLAGS.checkpoint, config, named,
                                                             lengths)
  try:
    documents = pipeline.load_documents(pipeline.corpus_files(
        [p for p in files.split(",") if p.strip()]))
  except (FileNotFoundError, ValueError) as error:
    cli.fail(str(error))
  _, validation = pipeline.split(documents)
  eos = tokenizer.eos_id()
  chosen, tokens = [], 0
  for text in validation:  # whole documents long enough for the longest length
    ids = tokenizer.encode(text) + ([eos] if eos >= 0 else [])
    if len(ids) > max(lengths) + 1 and tokens < FLAGS.max_tokens:
      chosen.append(ids)
      tokens += len(ids) - 1
  if not chosen:
    cli.fail(f"no held-out document is longer than {max(lengths)} tokens; use shorter --seq_len "
         "or --config.data.files with longer documents")
  scorer = (CacheScorer if FLAGS.through_cache else Scorer)(model, mesh)
  results = []
  for seq_len in tqdm(lengths, desc="eval_ppl", disable=None):
    ppl, count = perplexity(scorer, chosen, seq_len, min(FLAGS.stride, seq_len), FLAGS.batch_size)
    results.append({"seq_len": seq_len, "ppl": ppl, "tokens": count})
  print(f"{'seq_len':>8} {'ppl':>10} {'tokens':>8}   ({len(chosen)} documents)")
  for r in results:
    print(f"{r['seq_len']:>8} {r['ppl']:>10.3f} {r['tokens']:>8}")
  step_dir = ckpt_lib.find_step_dir(FLAGS.checkpoint)
  path = FLAGS.plot or os.path.join(ckpt_lib.run_dir(step_dir), "eval", "ppl.png")
  plot(results, path, FLAGS.label or FLAGS.checkpoint)
  cli.summary([f"plot: {path}",
               f"next: the same with --config.model.rope.scaling.type=yarn (or linear, ntk) "
               "to compare RoPE scalings; python -m tools.eval_passkey "
               f"--checkpoint={FLAGS.checkpoint} for retrieval"])
  print(json.dumps({"results": results, "mesh": dict(mesh.shape),
                    "devices": len(jax.devices())}))  # of the process (virtual CPU ones too)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main, flags_parser=cli.parse_flags)
