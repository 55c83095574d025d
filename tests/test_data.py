"""Tokenizer and input pipeline: exact round trips, packing invariants, determinism, resume."""

import json
import re

import numpy as np
import pytest

from data import pipeline, tokenizer as tokenizer_lib

SEQ_LEN, BATCH = 128, 4


@pytest.fixture(scope="module")
def corpus():
  files = pipeline.default_corpus()[:40]
  return files, pipeline.load_documents(files)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
  files, documents = corpus
  return tokenizer_lib.load_or_train(str(tmp_path_factory.mktemp("assets")), files,
                                     lambda: documents, vocab_size=1024)


def test_tokenizer_round_trips_code_exactly(corpus, tokenizer):
  _, documents = corpus
  for text in documents + ["def f(x):\n\tif x == 1:\n        return 12345  # é ✓ \r\n"]:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_is_cached_and_deterministic(corpus, tokenizer, tmp_path):
  files, documents = corpus
  again = tokenizer_lib.load_or_train(str(tmp_path), files, lambda: documents, vocab_size=1024)
  assert again.serialized_model_proto() == tokenizer.serialized_model_proto()
  calls = []
  cached = tokenizer_lib.load_or_train(str(tmp_path), files,
                                       lambda: calls.append(1) or documents, vocab_size=1024)
  assert not calls and cached.vocab_size() == 1024
  # Other settings train anew.
  other = tokenizer_lib.load_or_train(str(tmp_path), files, lambda: documents, vocab_size=512)
  assert other.vocab_size() == 512


def _batches(documents, tokenizer, count, **kwargs):
  iterator = pipeline.Batches(documents, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, seed=3,
                              **kwargs)
  return iterator, [next(iterator) for _ in range(count)]


def test_rows_are_packed_documents(corpus, tokenizer):
  _, documents = corpus
  _, batches = _batches(documents, tokenizer, 3)
  for batch in batches:
    assert {k: v.shape for k, v in batch.items()} == {k: (BATCH, SEQ_LEN) for k in batch}
    for row in range(BATCH):
      inputs, targets = batch["inputs"][row], batch["targets"][row]
      segments, positions = batch["segment_ids"][row], batch["positions"][row]
      real = segments > 0
      assert real.all()  # documents are concatenated and cut: rows are full
      for segment in np.unique(segments[real]):
        where = segments == segment
        np.testing.assert_array_equal(positions[where], np.arange(where.sum()))
        # targets are the next inputs inside a document
        np.testing.assert_array_equal(targets[where][:-1], inputs[where][1:])


def test_first_fit_packing_keeps_documents_that_fit_whole(corpus, tokenizer):
  """data.packing=first_fit: a document of at most a row is never cut; longer ones are
  cut into row-sized pieces; padding is segment 0; the iterator still resumes exactly."""
  _, code = corpus
  rng = np.random.default_rng(0)
  short = [" ".join(f"w{rng.integers(1000)}" for _ in range(rng.integers(5, 30)))
           for _ in range(120)]
  documents = [doc for pair in zip(short[::3], short[1::3], short[2::3], code) for doc in pair]
  eos = tokenizer.eos_id()
  whole = {tuple(tokenizer.encode(doc) + [eos]) for doc in short}
  assert all(len(ids) - 1 <= SEQ_LEN for ids in whole)  # a row holds len - 1 predictions
  iterator, batches = _batches(documents, tokenizer, 12, packing="first_fit")
  seen_short = seen_cut = 0
  for batch in batches:
    for row in range(BATCH):
      segments, positions = batch["segment_ids"][row], batch["positions"][row]
      inputs, targets = batch["inputs"][row], batch["targets"][row]
      real = segments > 0
      if not real.all():  # padding only at the end
        assert not real[np.argmin(real):].any()
      for segment in np.unique(segments[real]):
        where = segments == segment
        np.testing.assert_array_equal(positions[where], np.arange(where.sum()))
        ids = tuple(inputs[where]) + (targets[where][-1],)
        if ids in whole:
          seen_short += 1
        else:  # a piece of a long document: a full row, or the document's last piece
          seen_cut += 1
          assert where.sum() == SEQ_LEN or ids[-1] == eos
  assert seen_short > 10 and seen_cut > 10
  state = iterator.get_state()
  after = [next(iterator) for _ in range(2)]
  resumed, _ = _batches(documents, tokenizer, 0, packing="first_fit")
  resumed.set_state(state)
  for expected in after:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  with pytest.raises(ValueError, match="data.packing='best': use one of concat, first_fit"):
    _batches(documents, tokenizer, 1, packing="best")


def test_pipeline_is_deterministic_and_resumes_exactly(corpus, tokenizer):
  _, documents = corpus
  iterator, first = _batches(documents, tokenizer, 5)
  state = iterator.get_state()
  assert isinstance(json.loads(state), list)  # plain JSON, one state per row
  after = [next(iterator) for _ in range(3)]
  _, again = _batches(documents, tokenizer, 5)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  resumed, _ = _batches(documents, tokenizer, 0)
  resumed.set_state(state)
  for expected in after:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_hosts_build_exactly_their_rows_of_the_global_batch(corpus, tokenizer):
  """Two hosts with 2 rows each see what one host with all 4 rows sees."""
  _, documents = corpus
  _, whole = _batches(documents, tokenizer, 3)
  for first_row in (0, 2):
    _, part = _batches(documents, tokenizer, 3, first_row=first_row, rows=2)
    for got, expected in zip(part, whole):
      for key in got:
        np.testing.assert_array_equal(got[key], expected[key][first_row:first_row + 2])


def test_validation_split_is_held_out(corpus):
  _, documents = corpus
  train, validation = pipeline.split(documents)
  assert len(train) + len(validation) == len(documents) and validation
  train_ids = {id(doc) for doc in train}
  assert not any(id(doc) in train_ids for doc in validation)


def test_documents_are_read_one_file_at_a_time(tmp_path):
  (tmp_path / "a.jsonl").write_text("".join(f'{{"text": "doc {i}"}}\n' for i in range(60)))
  (tmp_path / "b.jsonl").write_bytes(b"not json\n")  # read only if the reader gets there
  files = pipeline.corpus_files([str(tmp_path / "*.jsonl")])
  documents = pipeline.iter_documents(files)
  first = [next(documents) for _ in range(60)]
  assert first == [f"doc {i}" for i in range(60)]
  with pytest.raises(pipeline.CorpusError, match="b.jsonl, line 1"):
    next(documents)
  train = [doc for i, doc in enumerate(first) if not pipeline.held_out(i)]
  assert (train, first[::pipeline.VALIDATION_EVERY]) == pipeline.split(first)


def test_missing_files_are_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.files: nothing matches"):
    pipeline.corpus_files([str(tmp_path / "*.txt")])
  (tmp_path / "empty.txt").write_text("   \n")
  with pytest.raises(ValueError, match="hold no text"):
    pipeline.load_documents(pipeline.corpus_files([str(tmp_path / "*.txt")]))


def test_every_kind_of_bad_jsonl_line_is_named(tmp_path):
  bad = {"unterminated": b'{"text": "abc\n', "not an object": b'[1, 2]\n',
         "no text": b'{"body": "x"}\n', "text not a string": b'{"text": 3}\n',
         "not UTF-8": b'{"text": "caf\xe9"}\n'}
  expected = {"unterminated": "invalid JSON", "not an object": 'no "text" field',
              "no text": 'no "text" field', "text not a string": 'the "text" field is not a string',
              "not UTF-8": "not UTF-8 (byte 13)"}
  for name, line in bad.items():
    path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + line)
    with pytest.raises(pipeline.CorpusError, match=re.escape(f"{path}, line 2: {expected[name]}")):
      pipeline.read_documents(str(path))
    skipped = []
    assert pipeline.read_documents(str(path), "skip", skipped) == ["fine"]
    assert len(skipped) == 1 and expected[name] in skipped[0]
  with pytest.raises(ValueError, match="data.bad_lines='drop': use one of error, skip"):
    pipeline.load_documents([str(path)], "drop")
