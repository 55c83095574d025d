"""serve.py: the engine against a no-cache forward, across meshes; sampling; the command
line with bad lines among good ones."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core import devices
from serving.engine import Engine
from serving.requests import Request
from serving.sampling import sample, top_k_top_p
from model import transformer
from model.config import ModelConfig
from parallel import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                     max_seq_len=512)
PROMPT_LENGTHS = (3, 17, 30, 5)  # two prompt buckets (16 and 32), uneven rows


def make_engine(mesh_sizes, devices=None, **options):
  mesh = mesh_lib.make_mesh(mesh_sizes, devices=devices)
  model = transformer.create(CONFIG, mesh, seed=7)
  return Engine(model, mesh, **{"decode_chunk": 4, **options})


@pytest.fixture(scope="module")
def engines():
  """The same parameters on one device, on a ring of 8, and on data 2 x ring 4."""
  return {"one": make_engine({"data": 1}, jax.devices()[:1]),
          "seq8": make_engine({"sequence": 8}),
          "data2-seq4": make_engine({"data": 2, "sequence": 4})}


def requests(rng, **fields):
  """Fresh random prompts of PROMPT_LENGTHS tokens, 9 new tokens each."""
  return [Request(line=i + 1, id=i, prompt_tokens=rng.integers(0, 256, n).tolist(),
                        max_tokens=9, **fields) for i, n in enumerate(PROMPT_LENGTHS)]


_REFERENCE_LENGTH = 64


@nnx.jit
def _full_forward(model, tokens):
  """Logits of one row of _REFERENCE_LENGTH tokens, no cache (causal: the padding after a
  position does not change its logits)."""
  return model(tokens[None], jnp.arange(_REFERENCE_LENGTH, dtype=jnp.int32)[None])[0]


def greedy_reference(model, prompt, count):
  """Greedy tokens and their log-probabilities by a full forward (no cache) at every step."""
  tokens, logprobs = list(prompt), []
  for _ in range(count):
    padded = np.zeros(_REFERENCE_LENGTH, np.int32)
    padded[:len(tokens)] = tokens
    logits = _full_forward(model, jnp.asarray(padded))[len(tokens) - 1]
    token = int(jnp.argmax(logits))
    logprobs.append(float(jax.nn.log_softmax(logits)[token]))
    tokens.append(token)
  return tokens[len(prompt):], logprobs


@pytest.fixture(scope="module")
def greedy_results(engines):
  rng = np.random.default_rng(11)
  batch = requests(rng, logprobs=True)
  return batch, {name: engine.generate(batch) for name, engine in engines.items()}


def test_greedy_equals_argmax_of_full_forward(engines, greedy_results):
  batch, results = greedy_results
  model = engines["one"].model
  for request in batch:
    expected, expected_logprobs = greedy_reference(model, request.prompt_tokens,
                                                   request.max_tokens)
    result = results["one"][request.line]
    assert result["tokens"] == expected, request.line
    assert result["finish_reason"] == "length"
    np.testing.assert_allclose(result["logprobs"], expected_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["seq8", "data2-seq4"])
def test_sequence_sharded_cache_gives_the_same_tokens(greedy_results, engines, name):
  batch, results = greedy_results
  for request in batch:
    assert results[name][request.line]["tokens"] == results["one"][request.line]["tokens"]
    np.testing.assert_allclose(results[name][request.line]["logprobs"],
                               results["one"][request.line]["logprobs"], atol=1e-5)
  # the cache really is spread over the ring: one prefill + one decode executable per
  # bucket pair, and no more
  assert engines[name].compilations <= 2 * 2


def test_compilations_stay_within_the_buckets(engines, rng):
  engine = engines["one"]
  engine.generate(requests(rng))  # compiled already if an earlier test ran
  before = engine.compilations
  # The same buckets (two rows of <= 16 tokens, two of 17-32, 8 new tokens of room):
  # other prompts and max_tokens, no compilation.
  batch = [Request(line=i, id=i, prompt_tokens=rng.integers(0, 256, n).tolist(),
                         max_tokens=m) for i, (n, m) in enumerate(((4, 9), (20, 6), (31, 7),
                                                                   (12, 8)), start=1)]
  engine.generate(batch)
  assert engine.compilations == before == 4  # (prefill + decode) x 2 prompt buckets


def test_compiled_from_parameter_shapes(engines, rng):
  """serve.py's start-up: an engine on the parameters' shapes compiles what a batch
  needs (while the checkpoint loads); with the real parameters it serves the batch
  without compiling again, with the same tokens."""
  served = engines["seq8"]
  graphdef, state = nnx.split(served.model)
  shapes = nnx.merge(graphdef, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  engine = Engine(shapes, served.mesh, decode_chunk=4)
  batch = requests(rng)
  engine.compile(batch)
  assert engine.compilations == 4  # (prefill + decode) x 2 prompt buckets
  engine.use_parameters(served.model)
  results = engine.generate(batch)
  assert engine.compilations == 4
  expected = served.generate(batch)
  assert [results[r.line]["tokens"] for r in batch] == [expected[r.line]["tokens"] for r in batch]


def test_a_bfloat16_table_is_held_as_its_bits_on_cpu(monkeypatch, rng):
  """transformer.serving_layout on CPU holds a bf16 embedding table as uint16 bits: the
  same tokens and log-probabilities, bit for bit, as the table held as bf16, and no
  program converts the whole table to float32 (XLA:CPU did so before a bf16 gather,
  once per call)."""
  config = dataclasses.replace(CONFIG, dtype="bfloat16", param_dtype="bfloat16")
  mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  model = transformer.create(config, mesh, seed=5)
  batch = requests(rng, logprobs=True)
  held = Engine(model, mesh, decode_chunk=4)
  assert held.state["embed"].get_value().dtype == jnp.uint16
  results = held.generate(batch)
  table_in_f32 = f"f32[{config.vocab_size},{config.dim}]"
  programs = [program.as_text() for program in held._compiled.values()]
  assert not any(table_in_f32 in text for text in programs)

  with monkeypatch.context() as patch:  # the layout of TPU and GPU: the table as bf16
    serving_layout = transformer.serving_layout
    patch.setattr(transformer, "serving_layout",
                  lambda state, platform: serving_layout(state, "tpu"))
    plain = Engine(model, mesh, decode_chunk=4)
    assert plain.state["embed"].get_value().dtype == jnp.bfloat16
    expected = plain.generate(batch)
    # the check above can tell: with the table as bf16, XLA:CPU converts it
    assert any(table_in_f32 in program.as_text() for program in plain._compiled.values())
  for request in batch:
    assert results[request.line]["tokens"] == expected[request.line]["tokens"]
    assert results[request.line]["logprobs"] == expected[request.line]["logprobs"]


def test_sampling_is_reproducible_per_seed(engines, rng):
  prompt = rng.integers(0, 256, 12).tolist()
  make = lambda line, seed, **kw: Request(line=line, id=line, prompt_tokens=prompt,
                                                max_tokens=12, temperature=1.0, seed=seed, **kw)
  batch = [make(1, 5), make(2, 5), make(3, 6), make(4, 5, top_k=1), make(5, 5, top_p=1e-6)]
  first = engines["one"].generate(batch)
  again = engines["seq8"].generate(batch[:1])  # another mesh, another batch
  assert first[1]["tokens"] == first[2]["tokens"] == again[1]["tokens"]
  assert first[1]["tokens"] != first[3]["tokens"]
  greedy, _ = greedy_reference(engines["one"].model, prompt, 12)
  assert first[4]["tokens"] == greedy and first[5]["tokens"] == greedy  # top-k 1, tiny top-p


def test_sample_keeps_only_the_top_k_and_top_p_tokens():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 3, jnp.float32))
  params = (jnp.ones(3), jnp.asarray([2, 0, 0], jnp.int32), jnp.asarray([1.0, 0.7, 0.85]),
            jnp.zeros(3, jnp.uint32))
  seen = [set(), set(), set()]
  draw = jax.jit(functools.partial(sample, sampling=True))  # eager: 70 s for 200 draws
  for index in range(200):
    tokens, _ = draw(logits, *params, jnp.full(3, index, jnp.int32))
    for row, token in enumerate(np.asarray(tokens)):
      seen[row].add(int(token))
  assert seen == [{0, 1}, {0, 1}, {0, 1, 2}]


@pytest.mark.parametrize("temperatures", [(0.0, 0.0, 0.0), (0.0, 1.0, 0.0)])
def test_one_sampling_program_keeps_greedy_rows_greedy(temperatures, rng):
  """sampling=True (one program for every batch, lax.cond): with every row greedy, or
  some, the greedy rows get the argmax and the logprobs of sampling=False exactly."""
  logits = jnp.asarray(rng.normal(size=(3, 50)), jnp.float32)
  params = (jnp.asarray(temperatures, jnp.float32), jnp.zeros(3, jnp.int32), jnp.ones(3),
            jnp.arange(3, dtype=jnp.uint32))
  index = jnp.zeros(3, jnp.int32)
  tokens, logprobs = jax.jit(functools.partial(sample, sampling=True))(logits, *params, index)
  greedy, greedy_logprobs = sample(logits, *params, index, sampling=False)
  np.testing.assert_array_equal(np.asarray(greedy), np.argmax(np.asarray(logits), axis=-1))
  for row, temperature in enumerate(temperatures):
    if temperature == 0:
      assert tokens[row] == greedy[row] and logprobs[row] == greedy_logprobs[row]
  expected = np.asarray(jax.nn.log_softmax(logits))[np.arange(3), np.asarray(tokens)]
  np.testing.assert_allclose(logprobs, expected, rtol=1e-5)


def _top_k_top_p_by_sorting(scaled, top_k, top_p):
  """The kept tokens [B, V] bool, as a sort finds them (float64)."""
  kept = np.ones(scaled.shape, bool)
  for row, (values, k, p) in enumerate(zip(scaled.astype(np.float64), top_k, top_p)):
    descending = -np.sort(-values)
    if k > 0:
      kept[row] &= values >= descending[k - 1]
    if p < 1:
      masked = np.where(kept[row], values, -np.inf)
      descending = -np.sort(-masked)
      probs = np.exp(descending - descending[0])
      cut = int(np.sum(np.cumsum(probs / probs.sum()) < p))
      kept[row] &= masked >= descending[cut]
  return kept


@pytest.mark.parametrize("vocab", [50, 3000])
def test_top_k_and_top_p_keep_what_a_sort_keeps(vocab, rng):
  """Random rows, rows of tied values, -inf entries; every mix of top-k and top-p."""
  scaled = rng.normal(size=(8, vocab)).astype(np.float32) * 3
  scaled[2] = np.round(scaled[2])                 # many ties
  scaled[3, : vocab // 2] = -np.inf               # half the vocabulary masked already
  top_k = np.array([0, 5, 7, 0, 1, vocab, 20, 0], np.int32)
  top_p = np.array([0.9, 1.0, 0.5, 0.3, 0.95, 0.999, 0.8, 1.0], np.float32)
  kept = np.isfinite(np.asarray(top_k_top_p(jnp.asarray(scaled), top_k, top_p)))
  np.testing.assert_array_equal(kept, _top_k_top_p_by_sorting(scaled, top_k, top_p)
                                & np.isfinite(scaled))
  assert kept[7].sum() == vocab and kept[4].sum() == 1


def test_end_of_sequence_stops_a_row(engines, greedy_results):
  batch, results = greedy_results
  reference = results["one"][batch[0].line]["tokens"]
  engine = engines["one"]
  stopping = Engine(engine.model, engine.mesh, eos_ids=[reference[3]], decode_chunk=4)
  result = stopping.generate(batch[:1])[batch[0].line]
  assert result["finish_reason"] == "stop"
  assert result["tokens"] == reference[:reference.index(reference[3])]


# --- the command line -----------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
  """A parameter-only checkpoint of CONFIG with a small sentencepiece tokenizer."""
  from configs import base
  from data import pipeline, tokenizer as tokenizer_lib
  from model import checkpoint
  run = str(tmp_path_factory.mktemp("serve") / "run")
  config = base.get_config()
  config.model.update(CONFIG.to_dict())
  config.model.vocab_size = 512
  documents = pipeline.load_documents(pipeline.default_corpus()[:20])
  tokenizer_lib.load_or_train(os.path.join(run, "assets"), [], lambda: documents, 512)
  model = transformer.create(ModelConfig.from_dict(config.model.to_dict()),
                             mesh_lib.make_mesh({"data": 1}, jax.devices()[:1]), seed=3)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  checkpoint.save_params(os.path.join(run, "checkpoints", "0"), params,
                         {"config": config.to_dict()})
  return run


def run_serve(checkpoint, lines, tmp_path, *extra, cpu_devices=2):
  """serve.py's batch mode on `lines`; cpu_devices=None: serve.py's own choice."""
  requests_path, output = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
  requests_path.write_bytes(b"".join(lines))
  devices = [f"--cpu_devices={cpu_devices}"] if cpu_devices else []
  result = subprocess.run(
      [sys.executable, "serve.py", f"--checkpoint={checkpoint}", f"--input={requests_path}",
       f"--output={output}", *devices, *extra], cwd=ROOT,
      env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=600)
  return result, output


GOOD = b'{"id": "first", "prompt": "def main(", "max_tokens": 6, "logprobs": true}\n'
BAD_LINES = {
    b"this is not json\n": "invalid JSON",
    b'{"id": 1, "max_tokens": 3}\n': "exactly one of `prompt`",
    b'{"id": 2, "prompt": ""}\n': "the prompt is empty",
    b'{"id": 3, "prompt": "x", "max_tokens": -2}\n': "`max_tokens` must be a positive integer",
    b'{"id": 4, "prompt": "x", "max_tokens": 2.5}\n': "`max_tokens` must be a positive integer",
    b'{"id": 5, "prompt": "x", "max_tokens": 600}\n': "exceeds the model's context of 512",
    b'{"id": 6, "prompt": "x", "temperature": -1}\n': "`temperature` must be a finite number",
    b'{"id": 7, "prompt": "x", "temperature": NaN}\n': "`temperature` must be a finite number",
    b'{"id": 8, "prompt": "x", "top_p": 1.5}\n': "`top_p` must be in (0, 1]",
    b'{"id": 9, "prompt_tokens": [1, 512]}\n': "outside the vocabulary [0, 512)",
    b'{"id": 10, "prompt": "caf\xe9"}\n': "not UTF-8",
    b'{"id": 11, "promt": "x"}\n': "unknown field(s) promt",
}


def test_bad_lines_get_errors_and_the_rest_is_served(checkpoint_dir, tmp_path):
  lines = [GOOD]
  for bad in BAD_LINES:
    lines += [bad, b'{"id": "between", "prompt_tokens": [5, 6, 7], "max_tokens": 3}\n']
  lines.append(b'{"id": "last", "prompt": "import os\\n", "max_tokens": 30, "stop": ["\\n"]}\n')
  result, output = run_serve(checkpoint_dir, lines, tmp_path, cpu_devices=None)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r["line"] for r in records] == list(range(1, len(lines) + 1))
  assert records[0]["id"] == "first" and len(records[0]["tokens"]) == 6
  assert len(records[0]["logprobs"]) == 6 and isinstance(records[0]["completion"], str)
  for record, (line, message) in zip(records[1::2], BAD_LINES.items()):
    assert record["finish_reason"] == "error" and message in record["error"], (line, record)
  for record in records[2:-1:2]:
    assert record["id"] == "between" and len(record["tokens"]) == 3
  assert records[-1]["finish_reason"] in ("stop", "length") and "\n" not in records[-1]["completion"]
  report = json.loads(result.stderr.strip().splitlines()[-1])
  assert report["requests"] == len(lines) and report["errors"] == len(BAD_LINES)
  assert report["generated_tokens"] == sum(len(r.get("tokens", [])) for r in records)
  for key in ("prompt_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "compile_s",
              "wall_s", "peak_memory_bytes"):
    assert report[key] > 0, key
  # short requests on a CPU host: one device, and the report says why; the process made
  # no other (an unused virtual device slowed decoding by a third)
  assert sorted(report["mesh"].values()) == [1, 1, 1, 1] and "one device" in report["mesh_reason"]
  assert report["devices"] == 1
  assert "mesh: CPU and no request of serve.long_context=" in result.stdout


def test_missing_checkpoint_or_input_is_one_clear_error(checkpoint_dir, tmp_path):
  result, _ = run_serve(tmp_path / "nothing", [GOOD], tmp_path)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "--checkpoint: no checkpoint in" in result.stderr
  result = subprocess.run(
      [sys.executable, "serve.py", f"--checkpoint={checkpoint_dir}",
       f"--input={tmp_path / 'missing.jsonl'}", f"--output={tmp_path / 'out.jsonl'}"],
      cwd=ROOT, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT), capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "--input: cannot read" in result.stderr


def test_a_checkpoint_without_tokenizer_serves_token_prompts(checkpoint_dir, tmp_path):
  import shutil
  bare = tmp_path / "bare"
  shutil.copytree(os.path.join(checkpoint_dir, "checkpoints"), bare / "checkpoints")
  result, output = run_serve(bare, [b'{"prompt_tokens": [3, 4, 5], "max_tokens": 2}\n',
                                    b'{"prompt": "text"}\n'], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  served, refused = [json.loads(line) for line in output.read_text().splitlines()]
  assert served["completion"] is None and len(served["tokens"]) == 2
  assert "no tokenizer" in refused["error"]


def test_a_long_request_puts_every_device_on_the_ring(checkpoint_dir, tmp_path):
  result, output = run_serve(
      checkpoint_dir, [b'{"prompt_tokens": [3, 4, 5, 6, 7], "max_tokens": 2}\n'], tmp_path,
      "--config.serve.long_context=4", cpu_devices=None)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stderr.strip().splitlines()[-1])
  assert report["mesh"]["sequence"] == report["devices"] == devices.CPU_DEVICES
  assert len(json.loads(output.read_text())["tokens"]) == 2
  assert "a request of 7 tokens >= serve.long_context=4" in report["mesh_reason"]


def test_a_checkpoint_trained_with_remat_is_served(checkpoint_dir):
  """A run trained with model.remat=full (as the real-size configs are): serving loads it
  without remat (nnx.remat inside the engine's jit failed every request) and generates
  what the same parameters generate without it."""
  from configs import base
  from serving import loading
  config = base.get_config()
  config.model.remat = "full"
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  model, saved, _ = loading.load_model(checkpoint_dir, config, {"model.remat"}, mesh, 64)
  assert model.config.remat == "none"
  request = Request(line=1, id=1, prompt_tokens=[5, 6, 7], max_tokens=4)
  result = Engine(model, mesh, decode_chunk=4).generate([request])[1]
  assert result["finish_reason"] == "length" and len(result["tokens"]) == 4, result
