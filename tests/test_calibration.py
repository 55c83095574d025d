"""Calibrated quantization (model/calibration.py): GPTQ against an unblocked float64
reference and against round to nearest on the inputs it saw, AWQ's folding exact and its
search no worse than round to nearest, and whole models quantized by each method."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import calibration, quantize, transformer
from model.config import ModelConfig

CONFIG = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                     max_seq_len=512)


def _correlated_inputs(rng, n, size, outliers=()):
  """[n, size] inputs with correlated channels (a random mixing), some much larger."""
  x = rng.standard_normal((n, size)) @ rng.standard_normal((size, size)) / np.sqrt(size)
  x[:, list(outliers)] *= 20
  return x


def _naive_gptq(w, h, largest, group):
  """GPTQ as the paper's recurrence, one channel at a time over the whole matrix,
  float64: w [O, I] -> dequantized [O, I]."""
  w, h = w.copy(), h.copy()
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  h += 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  out = np.zeros_like(w)
  scale = np.abs(w).max(1) / largest
  for i in range(w.shape[1]):
    if group and i % group == 0:
      scale = np.abs(w[:, i:i + group]).max(1) / largest
    q = np.clip(np.round(w[:, i] / np.where(scale == 0, 1, scale)), -largest, largest) * scale
    out[:, i] = q
    w[:, i:] -= np.outer((w[:, i] - q) / u[i, i], u[i, i:])
  return out


def _dequantized_matrix(values, scale, name, group):
  weight = quantize.dequantize(quantize.QuantizedWeight(
      jnp.asarray(values), jnp.asarray(scale), quantize.IN_AXES[name], group))
  return calibration.matrix(np.asarray(weight, np.float64), name)


@pytest.mark.parametrize("name,shape", [("w_gate", (96, 40)), ("wo", (4, 24, 40)),
                                        ("lm_head", (50, 96))])
@pytest.mark.parametrize("dtype,group", [("int8", 0), ("int4", 16)])
def test_gptq_is_the_papers_recurrence_and_beats_round_to_nearest(name, shape, dtype, group,
                                                                 rng):
  """calibration.gptq (blocks of 32 here, lazy updates, model/quantize.py's layout)
  gives the unblocked float64 recurrence's weights, and on the inputs it saw its
  outputs are closer to the float layer's than round to nearest's."""
  w = rng.standard_normal(shape)
  inputs = int(np.prod([shape[a] for a in quantize.IN_AXES[name]]))
  x = _correlated_inputs(rng, 400, inputs)
  h = x.T @ x / len(x)
  values, scale = calibration.gptq(w, name, h, dtype, group, block=32)
  assert values.dtype == quantize.DTYPES[dtype] and values.shape == shape
  got = _dequantized_matrix(values, scale, name, group)
  largest = 127 if dtype == "int8" else 7
  expected = _naive_gptq(calibration.matrix(w, name), h, largest, group)
  np.testing.assert_allclose(got, expected, atol=1e-6 * np.abs(expected).max())

  rtn = _dequantized_matrix(*quantize.quantize_weight(jnp.asarray(w, jnp.float32), name, dtype,
                                                      group), name, group)
  error = lambda q: np.linalg.norm(x @ (q - calibration.matrix(w, name)).T)
  assert error(got) < 0.9 * error(rtn), (error(got), error(rtn))


def test_gptq_generalizes_to_fresh_inputs_of_the_same_mixing(rng):
  """Fitted on 400 inputs, GPTQ's int4 layer is closer to the float one than round to
  nearest on 400 others drawn from the same distribution."""
  mixing = rng.standard_normal((64, 64)) / 8
  draw = lambda n: rng.standard_normal((n, 64)) @ mixing
  w = rng.standard_normal((64, 48))
  x = draw(400)
  values, scale = calibration.gptq(w, "w_gate", x.T @ x / 400, "int4", 16)
  got = _dequantized_matrix(values, scale, "w_gate", 16)
  rtn = _dequantized_matrix(*quantize.quantize_weight(jnp.asarray(w, jnp.float32), "w_gate",
                                                      "int4", 16), "w_gate", 16)
  fresh = draw(400)
  error = lambda q: np.linalg.norm(fresh @ (q - w.T).T)
  assert error(got) < 0.9 * error(rtn), (error(got), error(rtn))


def test_awq_search_keeps_outlier_channels_and_never_loses_to_round_to_nearest(rng):
  """On inputs with a few channels 20x larger, AWQ's chosen scale grows those channels
  (a > 0) and its rounded layer reproduces the outputs better than round to nearest's
  (a = 0 is round to nearest, so never worse)."""
  x = rng.standard_normal((300, 64)) * np.where(np.isin(np.arange(64), (3, 17, 40)), 20, 1)
  weights = [rng.standard_normal((48, 64)), rng.standard_normal((32, 64))]
  s, exponent = calibration.awq_scale(x, weights, "int4", 16)
  assert exponent > 0 and s[[3, 17, 40]].min() > np.median(s)
  error = lambda s: sum(np.linalg.norm((x / s) @ calibration.round_to_nearest(w * s, "int4", 16).T
                                       - x @ w.T) for w in weights)
  assert error(s) < 0.95 * error(np.ones(64))


@pytest.mark.parametrize("tie", [False, True])
def test_awq_folding_leaves_the_float_model_unchanged(tie, single_device_mesh, rng):
  """apply_awq multiplies weights by s and divides the norms, wv and w_up by it: the
  float model's logits are the same (grouped-query attention, 2 query heads per kv
  head; with a tied head the head is left alone)."""
  config = dataclasses.replace(CONFIG, tie_embeddings=tie)
  model = transformer.create(config, single_device_mesh, seed=3)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 40)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), tokens.shape)
  logits = lambda m: np.asarray(nnx.jit(lambda m: m(tokens, positions))(m), np.float64)
  before = logits(model)
  wq_before = np.asarray(model.blocks[0].attn.wq[...])
  inputs = calibration.projection_inputs(model, tokens)
  assert [len(inputs[name]) for name in ("attn", "wo", "mlp", "w_down", "lm_head")] == \
      [2, 2, 2, 2, 1]
  assert inputs["wo"][0].shape == (80, CONFIG.n_heads * CONFIG.head_dim)
  exponents = calibration.apply_awq(model, inputs, "int4", 32)
  assert ("head" in exponents) != tie
  assert not np.allclose(model.blocks[0].attn.wq[...], wq_before)  # something was scaled
  np.testing.assert_allclose(logits(model), before, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_a_model_quantized_by_each_method(method, single_device_mesh, rng):
  """calibration.quantize returns a model of the int4 config whose logits on other
  tokens are within int4's rounding of the float model's, and GPTQ and AWQ do not do
  worse than round to nearest on them."""
  config = dataclasses.replace(CONFIG, quantize="int4", quantize_group=32)
  calibrate = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (4, 128)), jnp.int32)
  tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 64)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), tokens.shape)
  logits = lambda m: np.asarray(nnx.jit(lambda m: m(tokens, positions))(m), np.float64)
  expected = logits(transformer.create(CONFIG, single_device_mesh, seed=4))
  errors = {}
  for each in ("rtn", method):
    model, report = calibration.quantize(transformer.create(CONFIG, single_device_mesh, seed=4),
                                         config, calibrate, each)
    assert model.config == config and model.blocks[1].mlp.w_down[...].dtype == jnp.int8  # held
    assert report["method"] == each
    got = logits(model)
    errors[each] = np.linalg.norm(got - expected) / np.linalg.norm(expected)
  assert 1e-3 < errors[method] < 0.2
  assert errors[method] <= 1.05 * errors["rtn"], errors


def test_the_quantize_tool_writes_int4_gptq_weights_served_without_the_original(tmp_path):
  """python -m tools.quantize --method=gptq --config.serve.quantize=int4 on a trained run:
  a new run directory whose config says int4, whose parameters are a fraction of the
  float32 bytes, and which tools.eval_ppl scores near the float run's perplexity; a
  second --out over it, a bad method and an impossible group are refused in one line."""
  import json
  from tests.test_extend import run
  from tests.test_train import run_train
  source = str(tmp_path / "source")
  run_train(source, "--config.train.steps=3")
  out = tmp_path / "int4"
  result = run(["-m", "tools.quantize", f"--checkpoint={source}", f"--out={out}",
                "--method=gptq", "--calibration_tokens=256", "--config.serve.quantize=int4",
                "--config.model.quantize_group=32"])
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["method"] == "gptq" and report["calibration_tokens"] >= 256
  assert report["parameter_bytes"] < 0.3 * report["float32_parameter_bytes"]
  saved = json.loads((out / "config.json").read_text())["model"]
  assert (saved["quantize"], saved["quantize_group"], saved["dtype"]) == ("int4", 32, "bfloat16")
  assert (out / "assets").is_dir()
  from model import checkpoint
  stored = checkpoint._stored_arrays(str(out / "checkpoints" / "0"))
  assert str(stored["blocks/0/mlp/w_down"].dtype) == "int4"  # (held in int8 on CPU)

  ppl = {}
  for name, checkpoint in (("float", source), ("int4", out)):
    result = run(["-m", "tools.eval_ppl", f"--checkpoint={checkpoint}", "--seq_len=128",
                  "--max_tokens=1000"])
    ppl[name] = json.loads(result.stdout.strip().splitlines()[-1])["results"][0]["ppl"]
  assert abs(ppl["int4"] / ppl["float"] - 1) < 0.1, ppl

  for args, message in (([f"--out={out}"], "exists"),
                        ([f"--out={tmp_path / 'x'}", "--method=gpt"], "gptq"),
                        ([f"--out={tmp_path / 'y'}", "--config.serve.quantize=int4",
                          "--config.model.quantize_group=48"], "model.quantize_group=48")):
    result = run(["-m", "tools.quantize", f"--checkpoint={source}", *args], check=False)
    assert result.returncode != 0 and message in result.stderr.strip().splitlines()[-1], \
        result.stderr[-2000:]
