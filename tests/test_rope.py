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


def test_unknown_scaling_type_is_a_config_error():
  with pytest.raises(ConfigError, match="model.rope.scaling.type='bogus'"):
    rope.inv_frequencies(RopeConfig(scaling=RopeScaling(type="bogus")), 16)
