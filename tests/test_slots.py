"""Continuous batching (serving/slots.py, serving/scheduler.py): greedy tokens equal a
no-cache forward's for requests that join and leave slots while others decode, with
prompts prefilled in chunks, on one device and on a ring."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import transformer
from parallel import mesh as mesh_lib
from serving.engine import Engine
from serving.requests import Request
from serving.scheduler import Scheduler
from serving.slots import SlotEngine, chunk_sizes
from tests.test_serve import CONFIG, greedy_reference

PROMPTS = (3, 17, 40, 5, 33, 1)  # chunks of 16 and 32: 40 and 33 take two chunks


def make_scheduler(mesh_sizes, devices=None, slots=2, **options):
  mesh = mesh_lib.make_mesh(mesh_sizes, devices=devices)
  model = transformer.create(CONFIG, mesh, seed=7)
  ring = mesh.shape["sequence"]
  chunks = chunk_sizes(16, 32, ring)
  # live buckets 16, 32, 64, 96: decode calls cross them as rows fill
  engine = SlotEngine(model, mesh, slots=slots, chunks=chunks, decode_steps=3, min_live=16,
                      capacity=SlotEngine.capacity_for(64, chunks[-1], ring))
  engine.reset()
  return Scheduler(engine, **options), model, mesh


def serve_all(scheduler, requests):
  """Submits every request at once and waits for all; returns their jobs."""
  finished = threading.Semaphore(0)
  scheduler.start()
  try:
    jobs = [scheduler.submit(r, lambda job: job.done and finished.release()) for r in requests]
    for _ in jobs:
      assert finished.acquire(timeout=300)
  finally:
    scheduler.stop()
  return jobs


@pytest.mark.parametrize("mesh_sizes", [{"data": 1}, {"sequence": 8}], ids=["one", "seq8"])
def test_continuous_batching_gives_the_full_forwards_greedy_tokens(mesh_sizes, rng):
  devices = jax.devices()[:1] if mesh_sizes == {"data": 1} else None
  # on one device, one decode step per call while a prompt is prefilled (3 otherwise)
  short = 1 if devices else None
  scheduler, model, _ = make_scheduler(mesh_sizes, devices, prefill_decode_steps=short)
  calls, decode = [], scheduler.engine.decode

  def recorded(*args, steps=None):
    result = decode(*args, steps=steps)
    calls.append((steps, result[0]))
    return result

  scheduler.engine.decode = recorded
  requests = [Request(line=i, id=i, prompt_tokens=rng.integers(0, 256, n).tolist(),
                      max_tokens=int(m), logprobs=True)
              for i, (n, m) in enumerate(zip(PROMPTS, (7, 2, 9, 1, 5, 8)))]
  jobs = serve_all(scheduler, requests)
  # the step count asked for is the count run (a call may stop early when all rows end)
  assert all(ran <= (asked or 3) for asked, ran in calls)
  assert any(asked == short and ran == (short or 3) for asked, ran in calls), calls
  for job in jobs:
    expected, logprobs = greedy_reference(model, job.request.prompt_tokens,
                                          job.request.max_tokens)
    assert job.completion.finish_reason == "length" and job.error is None, job.error
    assert job.completion.tokens == expected, job.request.line
    np.testing.assert_allclose(job.completion.logprobs, logprobs, rtol=1e-4, atol=1e-4)
  # more requests than slots: the later ones waited and joined slots as others left
  assert scheduler.stats["decode_tokens"] == sum(r.max_tokens - 1 for r in requests)


@pytest.mark.parametrize("mesh_sizes", [{"data": 1}, {"sequence": 8}], ids=["one", "seq8"])
def test_a_cached_prefix_gives_the_same_tokens(mesh_sizes, rng):
  from serving.prefix_cache import PrefixCache
  devices = jax.devices()[:1] if mesh_sizes == {"data": 1} else None
  cache = PrefixCache(block=16, budget_bytes=1 << 30)
  scheduler, model, _ = make_scheduler(mesh_sizes, devices, slots=2, prefix_cache=cache)
  document = rng.integers(0, 256, 40).tolist()
  first = Request(line=0, id=0, prompt_tokens=document + [7, 8, 9], max_tokens=4)
  # the same 40 tokens, then another question: its first 32 (two blocks) come cached
  second = Request(line=1, id=1, prompt_tokens=document + rng.integers(0, 256, 9).tolist(),
                   max_tokens=6)
  other = Request(line=2, id=2, prompt_tokens=rng.integers(0, 256, 20).tolist(), max_tokens=3)
  jobs = serve_all(scheduler, [first]) + serve_all(scheduler, [second, other])
  assert [job.cached_tokens for job in jobs] == [0, 32, 0]
  for job in jobs:
    expected, _ = greedy_reference(model, job.request.prompt_tokens, job.request.max_tokens)
    assert job.completion.tokens == expected, job.request.line


def test_decode_steps_of_zero_are_refused_naming_the_field():
  from configs import base
  from core.errors import ConfigError
  from serving import service
  serve = base.get_config().serve
  service.decode_steps_check(serve)
  serve.prefill_decode_steps = 0
  with pytest.raises(ConfigError, match="serve.prefill_decode_steps=0.*prefill_decode_steps=2"):
    service.decode_steps_check(serve)


@pytest.mark.parametrize("mesh_sizes", [
    {"data": 1}, pytest.param({"sequence": 8}, marks=pytest.mark.slow)], ids=["one", "seq8"])
def test_a_bf16_cache_held_as_bits_decodes_as_a_bf16_cache(mesh_sizes, rng, monkeypatch):
  """On CPU the slot engine's bfloat16 cache is stored as uint16 bits
  (model/kv_cache.held_dtype): its tokens and log-probabilities are exactly those of the
  same cache held as bfloat16."""
  import dataclasses

  from model import kv_cache
  devices = jax.devices()[:1] if mesh_sizes == {"data": 1} else None
  config = dataclasses.replace(CONFIG, dtype="bfloat16")
  requests = [Request(line=i, id=i, prompt_tokens=rng.integers(0, 256, n).tolist(),
                      max_tokens=6, logprobs=True) for i, n in enumerate((3, 40, 17))]
  outcomes = {}
  for held in ("bits", "bfloat16"):
    if held == "bfloat16":
      monkeypatch.setattr(kv_cache, "held_dtype",
                          lambda dtype, mesh, live_slices: jnp.dtype(dtype))
    mesh = mesh_lib.make_mesh(mesh_sizes, devices=devices)
    model = transformer.create(config, mesh, seed=7)
    ring = mesh.shape["sequence"]
    chunks = chunk_sizes(16, 32, ring)
    engine = SlotEngine(model, mesh, slots=2, chunks=chunks, decode_steps=3, min_live=16,
                        capacity=SlotEngine.capacity_for(64, chunks[-1], ring))
    engine.reset()
    assert engine.cache.keys[0].dtype == (jnp.uint16 if held == "bits" else jnp.bfloat16)
    jobs = serve_all(Scheduler(engine), requests)
    outcomes[held] = [(j.completion.tokens, j.completion.logprobs) for j in jobs]
  assert outcomes["bits"] == outcomes["bfloat16"]
  assert all(len(tokens) == 6 for tokens, _ in outcomes["bits"])


def test_ragged_rows_decode_as_the_bucketed_programs(rng):
  """On XLA:CPU with one device the slot engine has one decode program, whose rows attend
  each over its own live bucket (SlotEngine.ragged); it decodes the tokens and
  log-probabilities of the programs bucketed by the longest row and the row count."""
  requests = [Request(line=i, id=i, prompt_tokens=rng.integers(0, 256, n).tolist(),
                      max_tokens=m, logprobs=True)
              for i, (n, m) in enumerate(((3, 9), (40, 6), (17, 12), (33, 4), (1, 7)))]
  outcomes, decode_programs = {}, {}
  for ragged in (True, False):
    scheduler, _, _ = make_scheduler({"data": 1}, jax.devices()[:1], slots=3)
    engine = scheduler.engine
    assert engine.ragged  # CPU, one device, rows not rolling
    engine.ragged = ragged
    jobs = serve_all(scheduler, requests)
    outcomes[ragged] = [(j.completion.tokens, j.completion.logprobs) for j in jobs]
    decode_programs[ragged] = {key for key in engine.programs if key[0] == "decode"}
  assert [tokens for tokens, _ in outcomes[True]] == [tokens for tokens, _ in outcomes[False]]
  for (_, ragged), (_, bucketed) in zip(outcomes[True], outcomes[False]):
    np.testing.assert_allclose(ragged, bucketed, rtol=1e-5, atol=1e-5)
  assert decode_programs[True] == {("decode", (("steps", 3), ("live", 96), ("live_rows", 3)),
                                    None)}
  assert len(decode_programs[False]) > 1, decode_programs[False]
