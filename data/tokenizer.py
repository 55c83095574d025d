"""A sentencepiece tokenizer that round-trips code exactly, trained deterministically.

`load_or_train(assets_dir, files, vocab_size)` returns the tokenizer stored in
`assets_dir` when it was trained on the same corpus with the same settings, and
trains (and stores) a new one otherwise. Training is deterministic: lines are sampled
in Python with a fixed seed (sentencepiece's own sampling is not reproducible) and
the model is written to memory, so no path is stored inside it.

Settings for code (docs/library-notes.md, "sentencepiece"): BPE with byte fallback, digits
split, no whitespace normalisation, "\\n" and "\\t" as user-defined symbols (training
is line based, so newlines never appear in the training text), so that
decode(encode(text)) == text for any text without U+2581.
"""

import hashlib
import io
import json
import os
import random
import re

import sentencepiece as spm

SETTINGS = dict(model_type="bpe", byte_fallback=True, split_digits=True,
                allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                normalization_rule_name="identity", add_dummy_prefix=False,
                character_coverage=1.0, user_defined_symbols=["\n", "\t"],
                max_sentence_length=16384, bos_id=-1, eos_id=1, unk_id=0, pad_id=2,
                num_threads=2)
SAMPLE_LINES = 200_000  # lines sampled for training; enough for an 8K-32K vocabulary
VERSION = 1             # bump when SETTINGS or the sampling change
INFO = "tokenizer_fingerprint.json"  # what the stored model was trained on


def _fingerprint(files, vocab_size) -> str:
  digest = hashlib.sha256(json.dumps([VERSION, vocab_size, SETTINGS, SAMPLE_LINES]).encode())
  for path in files:
    stat = os.stat(path)
    digest.update(f"{path}\0{stat.st_size}\0".encode())
  return digest.hexdigest()


def _sample_lines(documents, count, seed=0):
  lines = [line for doc in documents for line in doc.split("\n") if line.strip()]
  if len(lines) > count:
    lines = random.Random(seed).sample(lines, count)
  return lines


def load_or_train(assets_dir: str, files: list[str], documents, vocab_size: int,
                  verbose: bool = False):
  """The tokenizer for (files, vocab_size): cached in assets_dir, else trained there.

  `documents` is a callable returning an iterator over the corpus' texts (only
  called when training is needed). `verbose`: let sentencepiece's trainer print its
  settings and progress (hundreds of lines on stderr).
  """
  model_path = os.path.join(assets_dir, "tokenizer.model")
  info_path = os.path.join(assets_dir, INFO)
  fingerprint = _fingerprint(files, vocab_size)
  if os.path.exists(model_path) and os.path.exists(info_path):
    with open(info_path) as f:
      if json.load(f).get("fingerprint") == fingerprint:
        return spm.SentencePieceProcessor(model_file=model_path)
  os.makedirs(assets_dir, exist_ok=True)
  lines = _sample_lines(documents(), SAMPLE_LINES)
  if not lines:
    raise ValueError("the corpus has no text to train a tokenizer on; check data.files")
  model = io.BytesIO()  # in memory: no model prefix (a path) gets stored in the model
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                   vocab_size=vocab_size, minloglevel=0 if verbose else 2,
                                   **SETTINGS)
  except RuntimeError as error:  # e.g. "Vocabulary size too high (512). ... <= 391."
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error))
    if too_small:
      raise ValueError(f"model.vocab_size={vocab_size} is less than this corpus' characters "
                       f"and bytes need; use at least {too_small.group(1)}") from None
    limit = re.search(r"<= (\d+)", str(error))
    if limit is None:
      raise
    raise ValueError(f"model.vocab_size={vocab_size} is more than a tokenizer trained on "
                     f"this corpus can hold; use at most {limit.group(1)}, or more "
                     "data.files") from None
  with open(model_path + ".tmp", "wb") as f:
    f.write(model.getvalue())
  os.replace(model_path + ".tmp", model_path)
  with open(info_path, "w") as f:
    json.dump({"fingerprint": fingerprint, "vocab_size": vocab_size, "files": len(files)}, f)
  return spm.SentencePieceProcessor(model_file=model_path)


class _HuggingFaceTokenizer:
  """A `tokenizer.json` (the `tokenizers` library, installed with transformers) with the
  sentencepiece methods the pipeline and the tools use."""

  def __init__(self, path: str, eos_id: int | None):
    from tokenizers import Tokenizer
    self._tokenizer, self._eos_id = Tokenizer.from_file(path), eos_id

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tokenizer.decode(list(ids), skip_special_tokens=False)

  def eos_id(self) -> int:
    return -1 if self._eos_id is None else self._eos_id

  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size()


def load(assets_dir: str, eos_id: int | None = None):
  """The tokenizer stored with a run or a converted model: `tokenizer.model`
  (sentencepiece: ringlm's own, Llama 2, Mistral) or else `tokenizer.json` (Hugging
  Face fast tokenizers: Llama 3, Qwen2; `eos_id` from the model's config)."""
  model_path = os.path.join(assets_dir, "tokenizer.model")
  if os.path.exists(model_path):
    return spm.SentencePieceProcessor(model_file=model_path)
  json_path = os.path.join(assets_dir, "tokenizer.json")
  if os.path.exists(json_path):
    return _HuggingFaceTokenizer(json_path, eos_id)
  raise FileNotFoundError(f"no tokenizer (tokenizer.model or tokenizer.json) in {assets_dir}")
