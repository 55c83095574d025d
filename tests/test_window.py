"""Sliding-window models end to end: converted Mistral and Qwen2 checkpoints against
transformers past their window (logits, greedy generation through both serving engines,
on one device and on the ring), the config's checks and the export."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from model import hf, kv_cache, transformer
from model.config import ConfigError, ModelConfig
from parallel import mesh as mesh_lib
from serving.engine import Engine
from serving.requests import Request
from serving.scheduler import Scheduler
from serving.slots import SlotEngine, chunk_sizes, kv_capacity
from tests.test_convert_hf import make_hf_model, ringlm_logits, hf_logits, tokens
from tests.test_serve import greedy_reference
from tests.test_slots import serve_all
from tools import convert_hf

WINDOW = 16
PROMPTS = (9, 48, 100)
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
  """(transformers model, converted run directory): Mistral, window 16, 3 layers."""
  root = tmp_path_factory.mktemp("mistral-window")
  model = make_hf_model(str(root / "hf"), "MistralForCausalLM", num_hidden_layers=3,
                        sliding_window=WINDOW, max_position_embeddings=256,
                        bos_token_id=None, eos_token_id=None)
  assert convert_hf.main([f"--hf_dir={root / 'hf'}", f"--out={root / 'run'}"]) == 0
  return model, str(root / "run")


def _hf_greedy(model, prompt):
  """transformers' greedy tokens and their log-probabilities."""
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
  new = out.sequences[0, len(prompt):].tolist()
  logprobs = [torch.log_softmax(logits[0].double(), -1)[token].item()
              for logits, token in zip(out.logits, new)]
  return new, logprobs


@pytest.fixture(scope="module")
def hf_greedy(mistral):
  model, _ = mistral
  prompts = [tokens(n, batch=1, seed=n)[0].tolist() for n in PROMPTS]
  return prompts, [_hf_greedy(model, p) for p in prompts]


def test_the_converted_config_keeps_the_window(mistral):
  _, run_dir = mistral
  with open(f"{run_dir}/config.json") as f:
    saved = json.load(f)["model"]
  assert saved["window"] == WINDOW and saved["full_layers"] == []


@pytest.mark.parametrize("mesh_sizes", [{"data": 1}, {"data": 2, "sequence": 4}], ids=["one", "data2-seq4"])
def test_mistral_logits_past_the_window(mistral, mesh_sizes):
  model, run_dir = mistral
  devices = jax.devices()[:1] if mesh_sizes == {"data": 1} else None
  mesh = mesh_lib.make_mesh(mesh_sizes, devices=devices)
  ours, _ = transformer.load(run_dir, mesh)
  forward = nnx.jit(lambda model, token_ids, positions: model(token_ids, positions))
  for length in PROMPTS:
    if length % mesh.shape["sequence"]:
      continue  # the ring splits the row evenly
    token_ids = tokens(length)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), token_ids.shape).copy()
    logits = np.asarray(forward(ours, token_ids, positions))
    diff = np.abs(logits - hf_logits(model, token_ids)).max()
    assert diff <= 1e-4, (length, diff)


@pytest.mark.parametrize("mesh_sizes", [
    pytest.param({"data": 1}, id="one", marks=pytest.mark.slow),
    pytest.param({"sequence": 8}, id="seq8")])
def test_batch_engine_generates_transformers_tokens(mistral, hf_greedy, mesh_sizes):
  _, run_dir = mistral
  devices = jax.devices()[:1] if mesh_sizes == {"data": 1} else None
  mesh = mesh_lib.make_mesh(mesh_sizes, devices=devices)
  model, _ = transformer.load(run_dir, mesh)
  prompts, expected = hf_greedy
  batch = [Request(line=i, id=i, prompt_tokens=p, max_tokens=NEW_TOKENS, logprobs=True)
           for i, p in enumerate(prompts)]
  results = Engine(model, mesh, decode_chunk=8).generate(batch)
  for request, (tokens_hf, logprobs_hf) in zip(batch, expected):
    result = results[request.line]
    assert result["tokens"] == tokens_hf, len(request.prompt_tokens)
    np.testing.assert_allclose(result["logprobs"], logprobs_hf, atol=1e-4)


@pytest.mark.parametrize("rolling", [
    True, pytest.param(False, marks=pytest.mark.slow)], ids=["rolling", "whole"])
@pytest.mark.parametrize("mesh_sizes", [  # the ring: tests/test_slots.py's seq8 cases
    {"data": 1}, pytest.param({"sequence": 8}, marks=pytest.mark.slow)], ids=["one", "seq8"])
def test_continuous_batching_generates_transformers_tokens(mistral, hf_greedy, mesh_sizes,
                                                           rolling):
  """The HTTP server's engine; with a rolling cache of 47-48 slots a row keeps only the
  last ~window + chunk tokens, and requests of up to 124 tokens wrap it."""
  _, run_dir = mistral
  devices = jax.devices()[:1] if mesh_sizes == {"data": 1} else None
  mesh = mesh_lib.make_mesh(mesh_sizes, devices=devices)
  model, _ = transformer.load(run_dir, mesh)
  ring = mesh.shape["sequence"]
  chunks = chunk_sizes(16, 32, ring)
  layout = SlotEngine.row_layout(model.config, 128, chunks[-1], ring)
  assert layout.rolling and layout.capacity == -(-(WINDOW - 1 + 32) // ring) * ring
  assert layout.kept == 0
  if not rolling:
    layout = dataclasses.replace(layout, capacity=SlotEngine.capacity_for(128, chunks[-1], ring),
                                 rolling=False)
  engine = SlotEngine(model, mesh, slots=2, chunks=chunks, decode_steps=4, min_live=16,
                      capacity=layout.capacity, rolling=layout.rolling, kept=layout.kept)
  engine.reset()
  prompts, expected = hf_greedy
  jobs = serve_all(Scheduler(engine), [
      Request(line=i, id=i, prompt_tokens=p, max_tokens=NEW_TOKENS, logprobs=True)
      for i, p in enumerate(prompts)])
  for job, (tokens_hf, logprobs_hf) in zip(jobs, expected):
    assert job.error is None, job.error
    assert job.completion.tokens == tokens_hf, len(job.request.prompt_tokens)
    np.testing.assert_allclose(job.completion.logprobs, logprobs_hf, atol=1e-4)


@pytest.mark.parametrize("mesh_sizes", [
    pytest.param({"data": 1}, id="one", marks=pytest.mark.slow),
    pytest.param({"sequence": 4}, id="seq4")])
def test_rolling_cache_with_sinks_equals_the_full_forward(mesh_sizes, rng):
  """Sinks (no transformers form): a rolling row that keeps the first 4 tokens decodes
  what a no-cache forward of the whole context predicts, past the wrap."""
  config = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       mlp_dim=128, max_seq_len=512, window=12, sink_tokens=4)
  devices = jax.devices()[:1] if mesh_sizes == {"data": 1} else jax.devices()[:4]
  mesh = mesh_lib.make_mesh(mesh_sizes, devices=devices)
  model = transformer.create(config, mesh, seed=3)
  ring = mesh.shape["sequence"]
  chunks = chunk_sizes(8, 16, ring)
  layout = SlotEngine.row_layout(config, 64, chunks[-1], ring)
  assert layout.rolling and layout.kept == 4 and layout.capacity < 40
  engine = SlotEngine(model, mesh, slots=2, chunks=chunks, decode_steps=3, min_live=8,
                      capacity=layout.capacity, rolling=True, kept=layout.kept)
  engine.reset()
  requests = [Request(line=i, id=i, prompt_tokens=rng.integers(0, 256, n).tolist(),
                      max_tokens=m, logprobs=True)
              for i, (n, m) in enumerate([(5, 30), (37, 20), (20, 9)])]
  jobs = serve_all(Scheduler(engine), requests)
  for job in jobs:
    expected, logprobs = greedy_reference(model, job.request.prompt_tokens,
                                          job.request.max_tokens)
    assert job.error is None, job.error
    assert job.completion.tokens == expected, job.request.line
    np.testing.assert_allclose(job.completion.logprobs, logprobs, atol=1e-4)


def test_capacity_report_uses_the_rolling_row():
  """The KV-capacity figures: a window model's row costs its rolling slots, whatever the
  context, so the same memory serves far longer requests."""
  full = ModelConfig(n_layers=4, n_kv_heads=2, head_dim=64, dim=512, n_heads=8)
  windowed = dataclasses.replace(full, window=4096)
  per_token = kv_cache.per_token_bytes(full)
  chunks = chunk_sizes(16, 512, 1)
  layout = SlotEngine.row_layout(windowed, 32768, chunks[-1], 1)
  assert layout.rolling and layout.capacity == 4096 - 1 + 512
  whole = kv_capacity(per_token_bytes=per_token, free_bytes=256 << 20, slots=4,
                      max_context=32768, largest_chunk=512, ring_size=1)
  rolled = kv_capacity(per_token_bytes=per_token, free_bytes=256 << 20, slots=4,
                       max_context=32768, largest_chunk=512, ring_size=1,
                       rolling_slots=layout.capacity)
  assert rolled["fits"] and rolled["max_context"] == 32768
  assert rolled["cache_bytes"] * 6 <= whole["cache_bytes"]
  assert not whole["fits"]


def test_qwen2_with_full_and_sliding_layers(tmp_path, single_device_mesh):
  """Qwen2's use_sliding_window + max_window_layers: layer 0 sees everything, 1 and 2 a
  window of 12; logits equal past the window, and the export round-trips."""
  model = make_hf_model(str(tmp_path / "hf"), "Qwen2ForCausalLM", num_hidden_layers=3,
                        use_sliding_window=True, sliding_window=12, max_window_layers=1,
                        max_position_embeddings=256)
  assert model.config.layer_types == ["full_attention"] + ["sliding_attention"] * 2
  assert convert_hf.main([f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'run'}"]) == 0
  config, _ = hf.model_config_from_hf(model.config.to_dict())
  assert (config.window, config.full_layers) == (12, (0,))
  token_ids = tokens(100)
  diff = np.abs(ringlm_logits(str(tmp_path / "run"), single_device_mesh, token_ids)
                - hf_logits(model, token_ids)).max()
  assert diff <= 1e-4
  assert convert_hf.main(["--to_hf", f"--checkpoint={tmp_path / 'run'}",
                          f"--out={tmp_path / 'back'}"]) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
  assert back.config.layer_types == model.config.layer_types
  assert back.config.sliding_window == 12
  np.testing.assert_array_equal(hf_logits(back, token_ids), hf_logits(model, token_ids))


def test_mistral_export_keeps_the_window(mistral, tmp_path):
  model, run_dir = mistral
  assert convert_hf.main(["--to_hf", f"--checkpoint={run_dir}", f"--out={tmp_path / 'back'}"]) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
  assert back.config.sliding_window == WINDOW
  token_ids = tokens(100)
  np.testing.assert_array_equal(hf_logits(back, token_ids), hf_logits(model, token_ids))


@pytest.mark.parametrize("fields,message", [
    (dict(window=-1), "model.window=-1 must be >= 0"),
    (dict(sink_tokens=4), "model.sink_tokens=4 needs model.window > 0"),
    (dict(full_layers=(0,)), r"model.full_layers=\(0,\) names layers exempt from a window"),
    (dict(window=8, full_layers=(5,)), r"each a distinct layer index in \[0, 4\)"),
])
def test_bad_window_fields_are_named(fields, message):
  with pytest.raises(ConfigError, match=message):
    ModelConfig(**fields)


@pytest.mark.parametrize("config,architecture,message", [
    (ModelConfig(window=8, sink_tokens=2), "MistralForCausalLM", "no attention sinks"),
    (ModelConfig(window=8, full_layers=(1,)), "LlamaForCausalLM", "per-layer windows exist"),
    (ModelConfig(window=8, full_layers=(1,)), "MistralForCausalLM", "windows every layer"),
])
def test_window_forms_without_a_transformers_form_are_refused(config, architecture, message):
  with pytest.raises(hf.ConversionError, match=message):
    hf.hf_config_from_model(config, {"architecture": architecture})


def test_a_llama_given_a_window_exports_as_mistral():
  config = hf.hf_config_from_model(ModelConfig(window=8), {"architecture": "LlamaForCausalLM"})
  assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] == 8
  assert hf.model_config_from_hf(config)[0].window == 8


def test_unknown_layer_types_are_refused():
  config = dict(architectures=["Qwen2ForCausalLM"], vocab_size=64, hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                use_sliding_window=True, sliding_window=8,
                layer_types=["chunked_attention", "full_attention"])
  with pytest.raises(hf.ConversionError, match="layer_types=.*chunked_attention"):
    hf.model_config_from_hf(config)


def test_a_checkpoint_converted_before_windows_is_refused(mistral, tmp_path):
  """An older conversion kept sliding_window only as a fact about the origin; loading it
  now names the fix instead of running the model without its window."""
  import shutil
  _, run_dir = mistral
  old = tmp_path / "old"
  shutil.copytree(run_dir, old)
  meta_file = old / "checkpoints" / "0" / "meta" / "metadata"
  with open(meta_file) as f:
    meta = json.load(f)
  meta["config"]["model"].update(window=0, full_layers=[])
  meta["config"]["hf"]["sliding_window"] = WINDOW
  with open(meta_file, "w") as f:
    json.dump(meta, f)
  mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  with pytest.raises(ConfigError, match=f"convert it again.*--config.model.window={WINDOW}"):
    transformer.abstract(str(old), mesh)
  model, _ = transformer.load(str(old), mesh, window=WINDOW)  # the override works
  assert model.config.window == WINDOW


def test_extension_keeps_the_window(mistral):
  """Checkpoint-extend from a window model with PI: the window comes with the
  checkpoint (it counts tokens, not RoPE positions), unless the run sets another."""
  from configs import extend
  from model import checkpoint
  from model.inherit import extension_settings
  _, run_dir = mistral
  saved = checkpoint.load_meta(run_dir)[1]["config"]
  config = extend.get_config()
  config.init_from = run_dir
  config.data.seq_len = 512
  config.model.rope.scaling.type = "linear"
  model, _ = extension_settings(config, saved, {"init_from", "data.seq_len",
                                                "model.rope.scaling.type"})
  extended = ModelConfig.from_dict(model)
  assert extended.window == WINDOW and extended.rope.scaling.factor == 512 / 256
  config.model.window = 64
  model, _ = extension_settings(config, saved, {"model.window"})
  assert ModelConfig.from_dict(model).window == 64


def test_the_http_start_up_plans_a_rolling_cache():
  """serve.py --port's KV-capacity check (serving/service.plan_capacity) for a window
  model: a budget too small for whole rows of 32K tokens fits rolling ones, and the
  start-up line says so; the full-attention model gets the message naming the fix."""
  from configs import base
  from serving import service
  serve = base.get_config().serve
  serve.batch_size, serve.memory_budget_mb, serve.prefix_cache_mb = 4, 64, 16
  mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  shape = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
               max_seq_len=32768)
  chunks = chunk_sizes(16, 512, 1)
  windowed = transformer.create(ModelConfig(window=1024, **shape), mesh)
  capacity = service.plan_capacity(windowed, mesh, serve, 32768, chunks)
  assert capacity.max_context == 32768 and capacity.batch == 4
  assert "a rolling cache of 1535 slots per request" in capacity.line()
  full = transformer.create(ModelConfig(**shape), mesh)
  with pytest.raises(ConfigError, match="serve.batch_size=4: 4 slots of model.max_seq_len"):
    service.plan_capacity(full, mesh, serve, 32768, chunks)
