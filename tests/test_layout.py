import numpy as np
import pytest

from parallel import layout


@pytest.mark.parametrize("num_shards", [1, 2, 4, 8])
def test_zigzag_gives_shard_i_chunks_i_and_mirror(num_shards):
  seq_len = 16 * num_shards
  chunk = seq_len // (2 * num_shards)
  order = layout.zigzag_indices(seq_len, num_shards)
  shards = order.reshape(num_shards, 2 * chunk)
  for i, shard in enumerate(shards):
    mirror = 2 * num_shards - 1 - i
    np.testing.assert_array_equal(shard[:chunk], np.arange(i * chunk, (i + 1) * chunk))
    np.testing.assert_array_equal(shard[chunk:], np.arange(mirror * chunk, (mirror + 1) * chunk))


def test_zigzag_round_trip_and_balance():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 64, 5))
  zig = layout.to_zigzag(x, 4)
  np.testing.assert_array_equal(layout.from_zigzag(zig, 4), x)
  # Causal work per shard (query-key pairs with kv_pos <= q_pos) is equal in zigzag order.
  positions = layout.to_zigzag(np.arange(64)[None], 4)[0].reshape(4, 16)
  work = [(positions[i][:, None] >= np.arange(64)[None]).sum() for i in range(4)]
  assert len(set(work)) == 1
  natural = [(np.arange(64).reshape(4, 16)[i][:, None] >= np.arange(64)[None]).sum()
             for i in range(4)]
  assert max(natural) > 3 * min(natural)


def test_zigzag_rejects_indivisible_length():
  with pytest.raises(ValueError, match="multiple of 2\\*4"):
    layout.zigzag_indices(60, 4)
