"""Documents -> tokens -> packed rows, with grain; deterministic and resumable.

A row of the global batch holds `seq_len` tokens of one or more documents:

  inputs          [seq_len] int32  token ids (0-padded)
  targets         [seq_len] int32  the next token of each input, within its document
  segment_ids     [seq_len] int32  document number inside the row, 1, 2, ...; 0 is padding
  positions       [seq_len] int32  position of each token in its document (restarts at 0)

`data.packing` says how documents become rows:
  concat     documents are concatenated and cut into full rows (a document that
             continues into the next row starts there as a new segment at position 0),
             so no row is padded. The default: no token is wasted.
  first_fit  a document that fits in a row stays whole: documents longer than a row
             are cut into row-sized pieces, and pieces are packed first-fit into rows,
             the rest padded (segment 0, not in the loss). For tasks that need the
             whole document in view, such as passkey retrieval (data/passkey.py).
Each row of the global batch is its own stream over a
disjoint share of the documents (`Batches`), so a host reads only the documents of
its rows, and what every row holds depends on the seed only, never on the number of
hosts. The state is small JSON, saved with every checkpoint, so a resumed run sees
exactly the batches it would have seen.

Corpus: `data.files` globs (.txt/.py files are one document each; .jsonl files one
document per line's "text" field), or by default the .py files of the running
Python's standard library in sorted order (real text, present on every machine).
Every `VALIDATION_EVERY`-th document is held out for validation. A .jsonl line that is
not UTF-8, not JSON, not an object or without a string "text" is named by file and
line: an error (`data.bad_lines=error`, the default), or counted and skipped
(`data.bad_lines=skip`).
"""

import glob
import json
import os
import sysconfig
import zlib

import grain
import numpy as np

VALIDATION_EVERY = 50
BAD_LINES = ("error", "skip")
PACKINGS = ("concat", "first_fit")
PACKING_BINS = 8  # first_fit: rows filled at a time (more bins, less padding)


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
  matches = {p: glob.glob(os.path.expanduser(p), recursive=True) for p in patterns}
  missing = [p for p, found in matches.items() if not found]
  if missing:
    raise FileNotFoundError(f"data.files: nothing matches {', '.join(missing)}")
  return sorted({f for found in matches.values() for f in found})


class CorpusError(ValueError):
  """A corpus line that cannot be read; the message names the file, the line and why."""


def _jsonl_text(raw: bytes) -> str:
  """The "text" of one .jsonl line, or CorpusError saying what is wrong with it."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise CorpusError(f"not UTF-8 (byte {error.start})") from None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    raise CorpusError(f"invalid JSON: {error.msg.removesuffix(' at')} at column "
                      f"{error.colno}") from None
  if not isinstance(record, dict) or "text" not in record:
    raise CorpusError('no "text" field (each line is an object {"text": "..."})')
  if not isinstance(record["text"], str):
    raise CorpusError('the "text" field is not a string')
  return record["text"]


def read_documents(path: str, bad_lines: str = "error", skipped: list | None = None) -> list[str]:
  """The documents of one corpus file. A bad .jsonl line raises CorpusError naming the
  file and line, or with bad_lines="skip" is left out and described in `skipped`."""
  if not path.endswith(".jsonl"):
    with open(path, encoding="utf-8", errors="replace") as f:
      return [f.read()]
  documents = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        documents.append(_jsonl_text(raw))
      except CorpusError as error:
        where = f"{path}, line {number}: {error}"
        if bad_lines != "skip":
          raise CorpusError(f"data.files: {where}; fix the line, or set data.bad_lines=skip "
                            "to leave such lines out") from None
        if skipped is not None:
          skipped.append(where)
  return documents


def iter_documents(files, bad_lines: str = "error", skipped: list | None = None):
  """The non-empty documents of `files` in load_documents' order, read one file at a time
  (a reader that needs only the first few stops early); arguments as read_documents'."""
  if bad_lines not in BAD_LINES:
    raise ValueError(f"data.bad_lines={bad_lines!r}: use one of {', '.join(BAD_LINES)}")
  for path in files:
    yield from (doc for doc in read_documents(path, bad_lines, skipped) if doc.strip())


def load_documents(files, bad_lines: str = "error", skipped: list | None = None) -> list[str]:
  """Every non-empty document of `files`; `bad_lines` and `skipped` as in read_documents."""
  documents = list(iter_documents(files, bad_lines, skipped))
  if not documents:
    raise ValueError(f"data.files: the {len(files)} files hold no text")
  return documents


def fingerprint(files) -> dict[str, str]:
  """{path: "<bytes>:<crc32>"} of the corpus files: saved with every checkpoint, so a
  resumed run can tell whether its data iterator's position still means the same tokens."""
  prints = {}
  for path in files:
    with open(path, "rb") as f:
      data = f.read()
    prints[os.path.abspath(path)] = f"{len(data)}:{zlib.crc32(data):08x}"
  return prints


def corpus_changes(saved: dict, current: dict) -> list[str]:
  """What differs between two fingerprints: "<path> changed|removed|added"."""
  changes = [f"{path} {'changed' if path in current else 'removed'}"
             for path, value in saved.items() if current.get(path) != value]
  return changes + [f"{path} added" for path in current if path not in saved]


def held_out(index: int) -> bool:
  """Whether the corpus' index-th document (load_documents' order) is a validation one."""
  return index % VALIDATION_EVERY == 0


def split(documents):
  """(train, validation) by document index: every VALIDATION_EVERY-th goes to validation."""
  validation = [doc for i, doc in enumerate(documents) if held_out(i)]
  train = [doc for i, doc in enumerate(documents) if not held_out(i)]
  return train, validation


def _example(ids):
  """A document's token ids -> inputs and next-token targets."""
  ids = np.asarray(ids, np.int32)
  return {"inputs": ids[:-1], "targets": ids[1:]}


def _to_row(packed):
  return {"inputs": packed["inputs"], "targets": packed["targets"],
          "segment_ids": packed["inputs_segment_ids"], "positions": packed["inputs_positions"]}


class _Pieces(grain.experimental.FlatMapTransform):
  """A document's example -> pieces of at most `seq_len` tokens."""
  max_fan_out = 1 << 20

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, example):
    return [{key: value[start:start + self.seq_len] for key, value in example.items()}
            for start in range(0, len(example["inputs"]), self.seq_len)]


def check_packing(packing: str) -> None:
  if packing not in PACKINGS:
    raise ValueError(f"data.packing={packing!r}: use one of {', '.join(PACKINGS)}")


def _row_stream(documents, tokenizer, seq_len, seed, repeat, packing):
  """One row of every batch: documents shuffled, tokenized, cut and packed into rows."""
  eos = tokenizer.eos_id()
  dataset = grain.MapDataset.source(documents).seed(seed).shuffle()
  if repeat:
    dataset = dataset.repeat(None)
  dataset = dataset.map(lambda text: _example(tokenizer.encode(text) + [eos]))
  examples = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
  lengths = {"inputs": seq_len, "targets": seq_len}
  if packing == "first_fit":
    pieces = grain.experimental.FlatMapIterDataset(examples, _Pieces(seq_len))
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces, length_struct=lengths, num_packing_bins=PACKING_BINS, seed=seed)
  else:
    packed = grain.experimental.ConcatThenSplitIterDataset(examples, length_struct=lengths)
  return iter(packed.map(_to_row))


class Batches:
  """Rows [first_row, first_row + rows) of every global [batch_size, seq_len] batch.

  Row r of the global batch is its own stream over documents r, r + batch_size, ...,
  so what a row holds does not depend on how many hosts share the batch: a host
  builds exactly its rows, and 2 hosts x 4 devices see the data 1 host x 8 devices
  sees. The state (one grain state per row) is JSON; it goes into every checkpoint
  through grain's orbax handler (get_state/set_state as bytes).
  """

  def __init__(self, documents, tokenizer, *, seq_len: int, batch_size: int, seed: int,
               first_row: int = 0, rows: int | None = None, repeat: bool = True,
               packing: str = "concat"):
    rows = batch_size if rows is None else rows
    check_packing(packing)
    if len(documents) < batch_size:
      raise ValueError(f"data.batch_size={batch_size} is more than the {len(documents)} "
                       "documents of the corpus; use fewer rows or more data.files")
    self._streams = [_row_stream(documents[row::batch_size], tokenizer, seq_len, seed + row,
                                 repeat, packing) for row in range(first_row, first_row + rows)]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = [next(stream) for stream in self._streams]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

  def get_state(self) -> bytes:
    return json.dumps([stream.get_state() for stream in self._streams]).encode()

  def set_state(self, state: bytes) -> None:
    for stream, row_state in zip(self._streams, json.loads(state), strict=True):
      stream.set_state(row_state)

  def start_prefetch(self) -> None:  # part of grain's checkpoint protocol; nothing to start
    pass
