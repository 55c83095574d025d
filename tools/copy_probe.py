"""In-context copying: does a model predict a random token sequence when it repeats?

  python -m tools.copy_probe --checkpoint=DIR [--length=100] [--rows=8] [--seed=0]

Each row is `length` random tokens, the same tokens again, then random tokens up to a
row length the ring divides. A model that can retrieve from its context (passkey
retrieval; perplexity that falls with longer context) predicts the second copy far
better than the first, which no model can predict (induction heads, Olsson et al.
2022). Prints the mean loss in nats per token on each copy; the last stdout line is
JSON {"first": ..., "second": ..., "copy_ratio": second / first, "length": ...}: near
1 when the model does not copy, near 0 when it copies perfectly.
"""

import json

import numpy as np
from absl import app, flags
from ml_collections import config_flags

import cli
from configs import base

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags, defined only when run as a program: the tools' flags share
  names (--config, --checkpoint, --cpu_devices), so importing two of them must not define any."""
  flags.DEFINE_string("checkpoint", None, "Run directory or checkpoint step.")
  flags.DEFINE_integer("length", 100, "Tokens in the sequence that repeats.")
  flags.DEFINE_integer("rows", 8, "Rows (independent random sequences).")
  flags.DEFINE_integer("seed", 0, "Seed of the random tokens.")
  config_flags.DEFINE_config_dict("config", base.get_config(),
                                  "Overrides of the checkpoint's config.")
  cli.define_flags(cpu_devices=None)  # as many as the mesh uses (evaluation.eval_devices)


FIRST_ID = 3  # sentencepiece's <unk>, <s>, </s> come first: the probe uses ids after them


def row_length(length: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that holds two copies of `length` tokens."""
  return -(-(2 * length) // multiple) * multiple


def probe_rows(vocab_size: int, length: int, rows: int, multiple: int, seed: int):
  """Token rows [rows, L + 1] (inputs = [:, :-1], targets = [:, 1:]): random tokens,
  the same `length` tokens again from index `length`, random padding after;
  L = row_length(length, multiple)."""
  total = row_length(length, multiple)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(FIRST_ID, vocab_size, (rows, total + 1), dtype=np.int32)
  tokens[:, length:2 * length] = tokens[:, :length]
  return tokens


def copy_losses(log_probs: np.ndarray, length: int) -> tuple[float, float]:
  """(mean loss on the first copy, on the second) from log p(target) [rows, L], where
  target j is token j + 1: the first copy's tokens 1..length-1 and the second copy's
  tokens length+1..2*length-1 (the second copy's first token cannot be predicted)."""
  first = -log_probs[:, 0:length - 1]
  second = -log_probs[:, length:2 * length - 1]
  return float(first.mean()), float(second.mean())


def main(argv):
  del argv
  named = cli.start()

  from serving.scoring import Scorer
  from tools import evaluation

  if FLAGS.length < 2 or FLAGS.rows < 1:
    cli.fail("--length must be at least 2 and --rows at least 1")
  multiple = 2 * len(evaluation.eval_devices(FLAGS.config, named))  # splits on the ring
  mesh, model, _, _ = evaluation.open_checkpoint(
      FLAGS.checkpoint, FLAGS.config, named, [row_length(FLAGS.length, multiple)],
      with_tokenizer=False)
  rows = probe_rows(model.config.vocab_size, FLAGS.length, FLAGS.rows, multiple, FLAGS.seed)
  log_probs, _ = Scorer(model, mesh)(rows[:, :-1], rows[:, 1:])
  first, second = copy_losses(np.asarray(log_probs, np.float64), FLAGS.length)
  print(f"loss on the first copy {first:.3f} nats/token, on the second {second:.3f} "
        f"(ratio {second / first:.3f}; 1: no copying, 0: perfect copying)")
  cli.summary([f"copy probe of {FLAGS.checkpoint}: {FLAGS.rows} rows of {FLAGS.length} tokens "
               "repeated once",
               f"next: python -m tools.eval_passkey --checkpoint={FLAGS.checkpoint}   "
               "(retrieval from the context)"])
  print(json.dumps({"first": first, "second": second, "copy_ratio": second / first,
                    "length": FLAGS.length, "rows": FLAGS.rows}))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main, flags_parser=cli.parse_flags)
