"""Documents -> tokens -> packed rows, with grain; deterministic and resumable.

A row of the global batch holds `seq_len` tokens of one or more documents:

  inputs          [seq_len] int32  token ids (0-padded)
  targets         [seq_len] int32  the next token of each input, within its document
  segment_ids     [seq_len] int32  document number inside the row, 1, 2, ...; 0 is padding
  positions       [seq_len] int32  position of each token in its document (restarts at 0)

Documents longer than a row are cut into pieces of at most seq_len + 1 tokens, each
packed as its own document. Every host reads a disjoint 1/process_count of the
documents and builds its rows of the global batch; the order is a function of the
seed only. The iterator's state is small JSON (`get_state`/`set_state`), saved with
every checkpoint, so a resumed run sees exactly the batches it would have seen.

Corpus: `data.files` globs (.txt/.py files are one document each; .jsonl files one
document per line's "text" field), or by default the .py files of the running
Python's standard library in sorted order (real text, present on every machine).
Every `VALIDATION_EVERY`-th document is held out for validation.
"""

import glob
import json
import os
import sysconfig

import grain
import numpy as np

VALIDATION_EVERY = 50


def default_corpus() -> list[str]:
  """The standard library's .py files (not site-packages), sorted."""
  root = sysconfig.get_paths()["stdlib"]
  files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
  return sorted(f for f in files if "site-packages" not in f and "dist-packages" not in f)


def corpus_files(patterns) -> list[str]:
  """Files named by `data.files` globs (a string or a list), or the default corpus."""
  if not patterns:
    return default_corpus()
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  files = sorted({f for pattern in patterns for f in glob.glob(os.path.expanduser(pattern),
                                                               recursive=True)})
  missing = [p for p in patterns if not glob.glob(os.path.expanduser(p), recursive=True)]
  if missing:
    raise FileNotFoundError(f"data.files: nothing matches {', '.join(missing)}")
  return files


def read_documents(path: str) -> list[str]:
  if path.endswith(".jsonl"):
    with open(path, encoding="utf-8") as f:
      return [json.loads(line)["text"] for line in f if line.strip()]
  with open(path, encoding="utf-8", errors="replace") as f:
    return [f.read()]


def load_documents(files) -> list[str]:
  documents = [doc for path in files for doc in read_documents(path) if doc.strip()]
  if not documents:
    raise ValueError(f"data.files: the {len(files)} files hold no text")
  return documents


def split(documents):
  """(train, validation) by document index: every VALIDATION_EVERY-th goes to validation."""
  validation = documents[::VALIDATION_EVERY]
  train = [doc for i, doc in enumerate(documents) if i % VALIDATION_EVERY]
  return train, validation


def _pieces(ids, seq_len):
  """A document's ids cut into examples of at most seq_len inputs (+1 for the targets)."""
  ids = np.asarray(ids, np.int32)
  inputs, targets = ids[:-1], ids[1:]
  return [{"inputs": inputs[start:start + seq_len], "targets": targets[start:start + seq_len]}
          for start in range(0, len(inputs), seq_len)]


def _to_row(packed):
  return {"inputs": packed["inputs"], "targets": packed["targets"],
          "segment_ids": packed["inputs_segment_ids"], "positions": packed["inputs_positions"]}


def make_iterator(documents, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, repeat: bool = True):
  """A resumable grain iterator of this host's [batch_size // process_count, seq_len] batches."""
  if batch_size % process_count:
    raise ValueError(f"data.batch_size={batch_size} must be a multiple of the {process_count} "
                     "processes")
  eos = tokenizer.eos_id()
  tokenize = lambda text: tokenizer.encode(text) + [eos]
  dataset = grain.MapDataset.source(documents).seed(seed).shuffle()
  if repeat:
    dataset = dataset.repeat(None)
  dataset = dataset[process_index::process_count].map(tokenize)
  examples = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16))
  examples = grain.experimental.FlatMapIterDataset(examples, _Pieces(seq_len))
  packed = grain.experimental.FirstFitPackIterDataset(
      examples, length_struct={"inputs": seq_len, "targets": seq_len}, num_packing_bins=8,
      seed=seed, shuffle_bins=True)
  batches = packed.map(_to_row).batch(batch_size // process_count, drop_remainder=repeat)
  return iter(batches)


class _Pieces(grain.experimental.FlatMapTransform):
  """A tokenized document -> its examples of at most seq_len tokens (see `_pieces`).

  grain's FlatMapIterDataset checkpoints the parent's state before the document and
  the index inside it, so a restored iterator re-cuts the same document.
  """

  max_fan_out = 1 << 20  # only FlatMapMapDataset uses it; documents may be long

  def __init__(self, seq_len):
    self.seq_len = seq_len

  def flat_map(self, ids):
    return _pieces(ids, self.seq_len)
