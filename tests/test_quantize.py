"""Serving precision: int8 rounding, the int8 KV cache against float64 attention and
against a float cache, bfloat16 parameters loaded from a float32 checkpoint, and the
precision serve.dtype chooses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from core.errors import ConfigError
from model import checkpoint, kv_cache, transformer
from model.config import ModelConfig
from parallel import quantized
from parallel.mesh import make_mesh
from parallel.ring import cache_attention
from serving import loading
from serving.engine import Engine
from serving.requests import Request

CONFIG = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                     max_seq_len=512)


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def test_int8_rounding_is_within_half_a_step(rng):
  x = rng.standard_normal((3, 5, 16)).astype(np.float32) * rng.uniform(0.01, 100, (3, 5, 1))
  x[1, 2] = 0  # a slice of zeros: scale 0, values 0, no NaN
  values, scale = quantized.quantize(x, 2)
  assert values.dtype == jnp.int8 and scale.shape == (3, 5)
  restored = np.asarray(values, np.float64) * np.asarray(scale)[..., None]
  assert np.all(np.abs(restored - x) <= np.asarray(scale)[..., None] / 2 + 1e-6)
  assert np.abs(np.asarray(values)).max() == 127
  assert np.all(np.asarray(values)[1, 2] == 0) and float(scale[1, 2]) == 0


@pytest.mark.parametrize("ring_size", [1, 4])
@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_a_quantized_cache_attention_matches_float64_over_the_dequantized_cache(
    dtype, ring_size, rng):
  """ring.cache_attention over an int8 or float8 cache (values + per token and head
  scales) against float64 NumPy attention over the dequantized keys and values: what is
  left is, for int8, the rounding of the queries to int8 (bf16-level, ~1e-2), for
  float8 nothing but float32 sums."""
  mesh = make_mesh({"sequence": ring_size}, devices=jax.devices()[:ring_size])
  batch, length, heads, kv_heads, dim, capacity = 2, 3, 4, 2, 16, 32
  q = rng.standard_normal((batch, length, heads, dim)).astype(np.float32)
  k = rng.standard_normal((batch, kv_heads, dim, capacity)).astype(np.float32) * 3
  v = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
  positions = np.tile(np.arange(capacity, dtype=np.int32), (batch, 1))
  q_positions = np.array([[4, 17, 31], [0, 9, 30]], np.int32)
  k8, k_scale = quantized.quantize(k, 2, dtype)
  v8, v_scale = quantized.quantize(v, 3, dtype)
  assert k8.dtype == jnp.dtype(dtype) and k_scale.shape == (batch, kv_heads, capacity)
  out = cache_attention(q, k8, v8, positions, q_positions, mesh=mesh, k_scale=k_scale,
                        v_scale=v_scale)

  kd = np.asarray(k8.astype(jnp.float32), np.float64) * np.asarray(k_scale)[:, :, None, :]
  vd = np.asarray(v8.astype(jnp.float32), np.float64) * np.asarray(v_scale)[..., None]
  qg = q.astype(np.float64).reshape(batch, length, kv_heads, heads // kv_heads, dim)
  scores = np.einsum("blkgd,bkdc->bkglc", qg, kd) / np.sqrt(dim)
  visible = positions[:, None, None, None, :] <= q_positions[:, None, None, :, None]
  scores = np.where(visible, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum("bkglc,bkcd->blkgd", weights, vd).reshape(batch, length, heads, dim)
  error = _relative_error(out, expected)
  assert error < (1e-2 if dtype == "int8" else 1e-5), error
  # the float cache's result differs by the cache's rounding, which the check can see
  exact = cache_attention(q, k, v, positions, q_positions, mesh=mesh)
  assert _relative_error(exact, expected) > 1e-3


def _requests(rng, count=3, max_tokens=6):
  return [Request(line=i + 1, id=i, prompt_tokens=rng.integers(0, 256, n).tolist(),
                  max_tokens=max_tokens, logprobs=True)
          for i, n in enumerate((5, 19, 30)[:count])]


@pytest.mark.parametrize("axes,dtype", [
    ({"data": 1}, "int8"), ({"data": 1}, "float8_e4m3fn"),
    pytest.param({"sequence": 4}, "int8", marks=pytest.mark.slow),
    pytest.param({"sequence": 4}, "float8_e4m3fn", marks=pytest.mark.slow)],
    ids=["one-int8", "one-fp8", "seq4-int8", "seq4-fp8"])
def test_a_quantized_cache_decodes_as_the_float_cache(axes, dtype, rng):
  """The batch engine with an int8 or float8 KV cache against the same parameters with
  a float32 cache: the log-probabilities of the tokens the float cache chose agree
  within the cache's rounding, on one device and with the cache split over a ring of 4."""
  mesh = make_mesh(axes, devices=jax.devices()[:4 if "sequence" in axes else 1])
  model = transformer.create(CONFIG, mesh, seed=3)
  quantized = nnx.merge(*nnx.split(transformer.Transformer(
      dataclasses.replace(CONFIG, kv_cache_dtype=dtype), mesh, rngs=nnx.Rngs(0)))[:1],
      nnx.split(model)[1])
  batch = _requests(rng)
  floats = Engine(model, mesh, decode_chunk=4).generate(batch)
  ints = Engine(quantized, mesh, decode_chunk=4).generate(batch)
  for line, result in floats.items():
    theirs = ints[line]
    assert theirs["finish_reason"] == "length"
    agree = [a == b for a, b in zip(result["tokens"], theirs["tokens"])]
    first = agree.index(False) if False in agree else len(agree)
    assert first >= 2, (result["tokens"], theirs["tokens"])
    np.testing.assert_allclose(theirs["logprobs"][:first], result["logprobs"][:first],
                               atol=0.05)


def test_the_int8_and_float8_caches_take_about_half_of_bfloat16(rng):
  bf16 = dataclasses.replace(CONFIG, dtype="bfloat16", n_kv_heads=4, head_dim=128)
  per_token = kv_cache.per_token_bytes
  for dtype in ("int8", "float8_e4m3fn"):
    assert per_token(dataclasses.replace(bf16, kv_cache_dtype=dtype)) < 0.55 * per_token(bf16)
  assert per_token(dataclasses.replace(bf16, kv_cache_dtype="float32")) == \
      2 * per_token(bf16) - 4
  with pytest.raises(ConfigError, match="kv_cache_dtype"):
    dataclasses.replace(CONFIG, kv_cache_dtype="fp4")


def test_a_float32_checkpoint_loads_as_bfloat16(tmp_path, single_device_mesh):
  """Parameters read as stored (their checksums verified) and cast to the target dtype."""
  model = transformer.create(CONFIG, single_device_mesh, seed=1)
  params = nnx.to_pure_dict(nnx.state(model))
  step_dir = str(tmp_path / "checkpoints" / "0")
  checkpoint.save_params(step_dir, params, {"config": {"model": CONFIG.to_dict()}})
  bf16 = dataclasses.replace(CONFIG, param_dtype="bfloat16")
  _, targets = transformer.abstract_params(bf16, single_device_mesh)
  loaded, _ = checkpoint.load_params(step_dir, targets)
  for got, original in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(original.astype(jnp.bfloat16)))


def test_serve_dtype_sets_the_precision(single_device_mesh):
  config = base.get_config()
  fields = loading.serving_precision(config, set(), {"dtype": "float32"}, single_device_mesh)
  # bf16 by default, its cache too (held as bits on CPU: test_a_bf16_cache_held_as_bits...)
  assert fields == {"dtype": "bfloat16", "param_dtype": "bfloat16"}
  assert loading.serving_precision(config, {"model.dtype"}, {"dtype": "float32"},
                                   single_device_mesh) == {}
  assert loading.serving_precision(config, set(), {"dtype": "float32", "kv_cache_dtype": "int8"},
                                   single_device_mesh) == {"dtype": "bfloat16",
                                                           "param_dtype": "bfloat16"}
  config.serve.dtype = "float16"
  with pytest.raises(ConfigError, match=r"serve.dtype='float16'"):
    loading.serving_precision(config, set(), {}, single_device_mesh)


SPECS = {  # every projection of the model: (spec, x shape, weight shape, weight name)
    "wq": ("blm,mhd->blhd", (2, 3, 32), (32, 4, 8)),
    "wo": ("blhd,hdm->blm", (2, 3, 4, 8), (4, 8, 32)),
    "w_gate": ("blm,mf->blf", (2, 3, 32), (32, 48)),
    "w_down": ("blf,fm->blm", (2, 3, 48), (48, 32)),
    "lm_head": ("blm,vm->blv", (2, 3, 32), (64, 32)),
}


def _dequantized(values, scale, name: str, group: int):
  """float64 values * scale in NumPy: one scale per output channel (group 0), or per
  `group` of the input channels flattened in order (model/quantize.py's layouts)."""
  from model.quantize import IN_AXES
  in_axes = IN_AXES[name]
  v = np.asarray(jnp.asarray(values).astype(jnp.int8), np.float64)
  scale = np.asarray(scale, np.float64)
  if not group:
    return v * np.expand_dims(scale, in_axes)
  first, last = in_axes[0], in_axes[-1]
  size = int(np.prod(v.shape[first:last + 1]))
  grouped = v.reshape(v.shape[:first] + (size // group, group) + v.shape[last + 1:])
  return (grouped * np.expand_dims(scale, first + 1)).reshape(v.shape)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("activations", [False, True], ids=["weight-only", "dynamic"])
@pytest.mark.parametrize("dtype,group", [("int8", 0), ("int4", 8)])
def test_a_quantized_projection_is_the_float_one_of_its_dequantized_weight(
    name, activations, dtype, group, rng):
  """quantize.project against float64 einsum over values * scale: exact up to float32
  sums with weight-only values (TPU/GPU); with the activations rounded per token too
  (CPU), within int8's rounding of x. int4 in groups of 8 input channels."""
  from model import quantize
  spec, x_shape, w_shape = SPECS[name]
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = rng.standard_normal(w_shape).astype(np.float32) * rng.uniform(0.1, 3, w_shape[-1])
  values, scale = quantize.quantize_weight(w, name, dtype, group)
  assert values.dtype == quantize.DTYPES[dtype] and values.shape == w.shape
  dequantized = _dequantized(values, scale, name, group)
  step = np.abs(w).max() / (127 if dtype == "int8" else 7)
  assert np.abs(dequantized - w).max() <= step / 2 + 1e-6  # to nearest, within half a step
  assert np.abs(np.asarray(values.astype(jnp.int8))).max() == (127 if dtype == "int8" else 7)
  weight = quantize.QuantizedWeight(values, scale, quantize.IN_AXES[name], group,
                                    activations=activations)
  np.testing.assert_allclose(quantize.dequantize(weight), dequantized, rtol=1e-6, atol=1e-7)
  expected = np.einsum(spec, x.astype(np.float64), dequantized)
  got = quantize.project(spec, jnp.asarray(x), weight)
  assert got.shape == expected.shape and got.dtype == jnp.float32
  assert _relative_error(got, expected) < (1e-2 if activations else 1e-6)
  # and the weight's own rounding is visible against the float weight
  assert _relative_error(np.einsum(spec, x, w), expected) > 1e-4


def test_a_long_int4_projection_on_cpu_dequantizes_the_weight(rng):
  """More rows than GROUPED_PRODUCT_ROWS (a prefill): the int4 weight is dequantized to
  x's dtype for one product, exact against float64 over the dequantized weight."""
  from model import quantize
  rows = quantize.GROUPED_PRODUCT_ROWS + 44
  x = rng.standard_normal((2, rows // 2, 32)).astype(np.float32)
  w = rng.standard_normal((32, 48)).astype(np.float32)
  values, scale = quantize.quantize_weight(w, "w_gate", "int4", 8)
  weight = quantize.QuantizedWeight(values, scale, (0,), 8, activations=True)
  expected = np.einsum("blm,mf->blf", x.astype(np.float64),
                       _dequantized(values, scale, "w_gate", 8))
  assert _relative_error(quantize.project("blm,mf->blf", jnp.asarray(x), weight),
                         expected) < 1e-6


def _float_checkpoint(tmp_path, mesh, config=CONFIG):
  model = transformer.create(config, mesh, seed=5)
  step_dir = str(tmp_path / "run" / "checkpoints" / "0")
  checkpoint.save_params(step_dir, nnx.to_pure_dict(nnx.state(model)),
                         {"config": {"model": config.to_dict()}})
  return model, step_dir


@pytest.mark.parametrize("dtype,group", [("int8", 0), ("int4", 32)])
def test_a_float_checkpoint_served_with_quantized_weights(dtype, group, tmp_path,
                                                           single_device_mesh, rng):
  """transformer.load with model.quantize reads a float checkpoint and rounds every
  projection weight and the embedding to int8 (per-channel scales) or int4 (groups of
  32 input channels); its logits are those of the float model holding the dequantized
  weights (NumPy), within the CPU path's int8 rounding of activations, and the norms
  stay float."""
  from model import quantize
  model, step_dir = _float_checkpoint(tmp_path, single_device_mesh)
  quantized, _ = transformer.load(step_dir, single_device_mesh, quantize=dtype,
                                  quantize_group=group or 128)
  state = nnx.to_pure_dict(nnx.state(quantized))
  for module, name in [("attn", "wq"), ("attn", "wo"), ("mlp", "w_down")]:
    values = state["blocks"][0][module][name]
    assert values.dtype == quantize.held_dtype(dtype, "cpu")  # int4 held in int8 on CPU
    expected_values, scale = quantize.quantize_weight(
        getattr(getattr(model.blocks[0], module), name)[...], name, dtype, group)
    np.testing.assert_array_equal(values.astype(jnp.int8), expected_values.astype(jnp.int8))
    np.testing.assert_allclose(state["blocks"][0][module][name + "_scale"], scale, rtol=1e-6)
  assert state["embed"].dtype == quantize.held_dtype(dtype, "cpu")
  assert state["lm_head_scale"].shape == ((CONFIG.vocab_size,) if not group else
                                          (CONFIG.vocab_size, CONFIG.dim // group))
  assert state["blocks"][0]["attn_norm"]["scale"].dtype == jnp.float32

  dequantized = transformer.create(CONFIG, single_device_mesh, seed=5)
  for layer, module in transformer.quantized_modules(dequantized):
    source = quantized if layer is None else quantized.blocks[layer]
    source = source if layer is None else getattr(source, "attn" if hasattr(module, "wq")
                                                  else "mlp")
    for name in quantize.IN_AXES:
      if hasattr(module, name):
        getattr(module, name)[...] = jnp.asarray(_dequantized(
            getattr(source, name)[...], getattr(source, name + "_scale")[...], name, group),
            jnp.float32)
  tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 24)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), tokens.shape)
  logits = lambda m: nnx.jit(lambda m: m(tokens, positions))(m)
  got = logits(quantized)
  assert _relative_error(got, logits(dequantized)) < 1e-2
  error = _relative_error(got, logits(model))
  assert 1e-4 < error < (3e-2 if dtype == "int8" else 2e-1), error


def test_int4_weights_decode_through_the_engines_programs(single_device_mesh, rng):
  """The batch engine (programs compiled ahead of time) with int4 weights, held in int8
  on CPU (quantize.held_dtype): every request decodes, with the log-probabilities of
  the float model holding the dequantized weights within the activations' rounding."""
  from model import quantize
  config = dataclasses.replace(CONFIG, quantize="int4", quantize_group=32)
  model = transformer.create(config, single_device_mesh, seed=6)
  assert model.blocks[0].mlp.w_up[...].dtype == jnp.int8
  assert int(jnp.abs(model.blocks[0].mlp.w_up[...].astype(jnp.int32)).max()) == 7
  dequantized = transformer.create(CONFIG, single_device_mesh, seed=6)
  for layer, module in transformer.quantized_modules(dequantized):
    source = model if layer is None else getattr(model.blocks[layer],
                                                 "attn" if hasattr(module, "wq") else "mlp")
    for name in quantize.IN_AXES:
      if hasattr(module, name):
        getattr(module, name)[...] = quantize.dequantize(quantize.QuantizedWeight(
            getattr(source, name)[...], getattr(source, name + "_scale")[...],
            quantize.IN_AXES[name], 32))
  batch = _requests(rng)
  got = Engine(model, single_device_mesh, decode_chunk=4).generate(batch)
  expected = Engine(dequantized, single_device_mesh, decode_chunk=4).generate(batch)
  for line, result in expected.items():
    assert got[line]["finish_reason"] == "length" and len(got[line]["tokens"]) == 6
    agree = [a == b for a, b in zip(result["tokens"], got[line]["tokens"])]
    first = agree.index(False) if False in agree else len(agree)
    assert first >= 2, (result["tokens"], got[line]["tokens"])
    np.testing.assert_allclose(got[line]["logprobs"][:first], result["logprobs"][:first],
                               atol=0.05)


def test_an_int8_checkpoint_cannot_be_loaded_as_float(tmp_path, single_device_mesh):
  config = dataclasses.replace(CONFIG, quantize="int8")
  _float_checkpoint(tmp_path, single_device_mesh, config)
  with pytest.raises(ConfigError, match="weights are int8"):
    transformer.load(str(tmp_path / "run"), single_device_mesh, quantize="")
  loaded, _ = transformer.load(str(tmp_path / "run"), single_device_mesh)
  assert loaded.blocks[0].attn.wq[...].dtype == jnp.int8


@pytest.mark.parametrize("cache", ["", "int8", "float8_e4m3fn"])
def test_scores_through_the_cache_equal_the_forwards(cache, single_device_mesh, rng):
  """serving.scoring.CacheScorer (second half decoded token by token over the cache)
  against the plain forward's scores: equal with a float32 cache, within the cache's
  rounding with an int8 or float8 one."""
  from serving.scoring import CacheScorer, Scorer
  model = transformer.create(dataclasses.replace(CONFIG, kv_cache_dtype=cache),
                             single_device_mesh, seed=2)
  tokens = rng.integers(0, CONFIG.vocab_size, (3, 33))
  expected, _ = Scorer(model, single_device_mesh)(tokens[:, :-1], tokens[:, 1:])
  got, _ = CacheScorer(model, single_device_mesh)(tokens[:, :-1], tokens[:, 1:])
  np.testing.assert_allclose(got[:, :16], expected[:, :16], rtol=1e-6)
  error = np.abs(got[:, 16:] - expected[:, 16:]).max()
  assert error < (2e-2 if cache else 1e-4), error
  if cache:
    assert error > 1e-6  # the rounding is in the scores


@pytest.mark.parametrize("mesh_sizes", [{"data": 1},
                                        pytest.param({"sequence": 4}, marks=pytest.mark.slow)],
                         ids=["one", "seq4"])
def test_continuous_batching_and_prefixes_with_an_int8_cache(mesh_sizes, rng):
  """The HTTP engine (serving/slots.py) with an int8 KV cache: requests that join and
  leave slots get the float model's log-probabilities within int8's rounding, and a
  prefix served from the prefix cache (int8 values and scales kept) gives the same
  tokens as prefilling it again."""
  from serving.prefix_cache import PrefixCache
  from serving.scheduler import Scheduler
  from serving.slots import SlotEngine, chunk_sizes
  from tests.test_serve import greedy_reference
  from tests.test_slots import serve_all
  devices = jax.devices()[:1] if mesh_sizes == {"data": 1} else jax.devices()[:4]
  mesh = make_mesh(mesh_sizes, devices=devices)
  float_model = transformer.create(CONFIG, mesh, seed=7)
  model = transformer.create(dataclasses.replace(CONFIG, kv_cache_dtype="int8"), mesh, seed=7)
  assert model.blocks[0].attn.wq[...].dtype == jnp.float32  # (only the cache is int8)
  ring = mesh.shape["sequence"]
  chunks = chunk_sizes(16, 32, ring)

  def scheduler(prefix_cache=None):
    engine = SlotEngine(model, mesh, slots=2, chunks=chunks, decode_steps=3, min_live=16,
                        capacity=SlotEngine.capacity_for(64, chunks[-1], ring))
    engine.reset()
    assert engine.cache.keys[0].dtype == jnp.int8 and len(engine.cache.key_scales) == 2
    return Scheduler(engine, prefix_cache=prefix_cache)

  document = rng.integers(0, 256, 40).tolist()
  first = Request(line=0, id=0, prompt_tokens=document + [7, 8, 9], max_tokens=4,
                  logprobs=True)
  second = Request(line=1, id=1, prompt_tokens=document + rng.integers(0, 256, 9).tolist(),
                   max_tokens=6, logprobs=True)
  other = Request(line=2, id=2, prompt_tokens=rng.integers(0, 256, 20).tolist(), max_tokens=5,
                  logprobs=True)
  cached = scheduler(PrefixCache(block=16, budget_bytes=1 << 30))
  jobs = serve_all(cached, [first]) + serve_all(cached, [second, other])
  assert [job.cached_tokens for job in jobs] == [0, 32, 0]
  again = serve_all(scheduler(), [second])[0]
  assert again.completion.tokens == jobs[1].completion.tokens
  np.testing.assert_allclose(again.completion.logprobs, jobs[1].completion.logprobs, atol=1e-5)
  for job in jobs:
    expected, logprobs = greedy_reference(float_model, job.request.prompt_tokens,
                                          job.request.max_tokens)
    got = job.completion
    agree = [a == b for a, b in zip(got.tokens, expected)] + [False]
    first_difference = agree.index(False)
    assert first_difference >= 2, (got.tokens, expected)
    np.testing.assert_allclose(got.logprobs[:first_difference], logprobs[:first_difference],
                               atol=0.05)
