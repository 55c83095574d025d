import numpy as np
import pytest

from model import rope
from model.config import ConfigError, RopeConfig, RopeScaling


def test_rotation_matches_complex_multiplication():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
  positions = rng.integers(0, 1000, (2, 5)).astype(np.int32)
  config = RopeConfig(theta=500.0)
  cos, sin = rope.rotary_tables(config, 8, positions)
  rotated = np.asarray(rope.apply_rotary(x, cos, sin))
  inv_freq = 1.0 / 500.0 ** (np.arange(0, 8, 2) / 8)
  phase = np.exp(1j * positions[..., None, None] * inv_freq)  # [B, L, 1, 4]
  expected = (x[..., :4] + 1j * x[..., 4:]) * phase
  np.testing.assert_allclose(rotated, np.concatenate([expected.real, expected.imag], -1),
                             rtol=1e-4, atol=1e-4)


def test_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, 1, 1, 1, 16)).astype(np.float32)
  config = RopeConfig()

  def score(q_pos, k_pos):
    rotated = [np.asarray(rope.apply_rotary(x, *rope.rotary_tables(config, 16, np.array([[p]]))))
               for x, p in ((q, q_pos), (k, k_pos))]
    return float((rotated[0] * rotated[1]).sum())

  assert score(10, 3) == pytest.approx(score(1010, 1003), rel=1e-4)
  assert score(10, 3) != pytest.approx(score(10, 9), rel=1e-2)


def test_linear_scaling_divides_positions():
  plain = rope.inv_frequencies(RopeConfig(), 16)
  linear = rope.inv_frequencies(RopeConfig(scaling=RopeScaling(type="linear", factor=4.0)), 16)
  np.testing.assert_allclose(linear, plain / 4)


HF_TYPES = {  # ringlm scaling -> transformers rope_parameters (theta 10000 unless set)
    "none": ({}, {"rope_type": "default"}),
    "theta": ({"theta": 1_000_000.0}, {"rope_type": "default", "rope_theta": 1_000_000.0}),
    "linear": ({"type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    # ntk is plain RoPE with a larger base: compare against that base
    "ntk": ({"type": "ntk", "factor": 4.0},
            {"rope_type": "default", "rope_theta": 10_000.0 * 4.0 ** (32 / 30)}),
    "dynamic": ({"type": "dynamic", "factor": 4.0, "original_max_len": 128},
                {"rope_type": "dynamic", "factor": 4.0}),
    "yarn": ({"type": "yarn", "factor": 4.0, "original_max_len": 64},
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "yarn-explicit": ({"type": "yarn", "factor": 8.0, "original_max_len": 32, "beta_fast": 16.0,
                       "beta_slow": 2.0, "attention_factor": 1.3, "truncate": False},
                      {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                       "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3,
                       "truncate": False}),
    "llama3": ({"type": "llama3", "factor": 8.0, "original_max_len": 64, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "theta": 500_000.0},
               {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("length", [100, 300])  # below and above dynamic's original 128
@pytest.mark.parametrize("name", sorted(HF_TYPES))
def test_tables_match_transformers(name, length):
  """cos and sin (YaRN's temperature included) equal transformers' Llama rotary
  embedding for the same settings, at every position of a run of `length` tokens."""
  import logging

  import torch
  from transformers import LlamaConfig
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

  ours, theirs = HF_TYPES[name]
  ours = dict(ours)
  theta = ours.pop("theta", 10_000.0)
  config = RopeConfig(theta=theta, scaling=RopeScaling(**ours))
  logging.getLogger("transformers").setLevel(logging.ERROR)
  hf = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=128,
                   rope_parameters={"rope_theta": theta, **theirs})
  embedding = LlamaRotaryEmbedding(hf)
  positions = np.arange(length)[None]
  hf_cos, hf_sin = embedding(torch.zeros(1, length, 32), torch.from_numpy(positions))
  cos, sin = rope.rotary_tables(config, 32, positions.astype(np.int32))
  # transformers repeats the table for both halves: [B, L, D] = [cos, cos]
  for ours_table, hf_table in ((cos, hf_cos), (sin, hf_sin)):
    np.testing.assert_allclose(np.concatenate([ours_table] * 2, -1), hf_table.numpy(),
                               rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("scaling, message", [
    (dict(type="bogus"), "model.rope.scaling.type='bogus' does not exist"),
    (dict(type="linear", factor=0.0), "model.rope.scaling.factor=0.0 must be > 0"),
    (dict(type="linear", factor=-2.0), "model.rope.scaling.factor=-2.0 must be > 0"),
    (dict(type="yarn", factor=4.0), "needs model.rope.scaling.original_max_len > 0"),
    (dict(type="llama3", factor=8.0, original_max_len=64, low_freq_factor=4.0),
     "high_freq_factor=4.0 must exceed"),
])
def test_bad_scaling_is_a_config_error(scaling, message):
  with pytest.raises(ConfigError, match=message):
    RopeScaling(**scaling)
