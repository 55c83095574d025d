"""Checkpoints: restore onto another mesh, skip damaged steps (truncated or flipped bits)."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import checkpoint as ckpt_lib
from parallel.mesh import make_mesh


def _state(seed, mesh):
  rng = np.random.default_rng(seed)
  sharded = jax.NamedSharding(mesh, jax.P("sequence"))
  params = {"w": jax.device_put(rng.standard_normal((16, 8)).astype(np.float32), sharded),
            "b": jnp.asarray(rng.standard_normal(8).astype(np.float32)).astype(jnp.bfloat16)}
  opt_state = {"mu": jax.device_put(rng.standard_normal((16, 8)).astype(np.float32), sharded),
               "count": jnp.asarray(seed, jnp.int32)}
  return params, opt_state


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@pytest.fixture
def saved(tmp_path):
  """Steps 1 and 2 written on a (sequence=2) mesh; returns their states and the directory."""
  mesh = make_mesh({"sequence": 2, "data": -1})
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  states = {step: _state(step, mesh) for step in (1, 2)}
  for step, (params, opt_state) in states.items():
    checkpointer.save(step, params, opt_state, None, {"note": step})
  checkpointer.close()
  return states, str(tmp_path)


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_restores_newest_onto_another_mesh(saved):
  states, directory = saved
  mesh = make_mesh({"sequence": 8})
  params, opt_state = _state(0, mesh)  # only shapes and the new shardings matter
  checkpointer = ckpt_lib.Checkpointer(directory)
  step, got_params, got_opt, meta = checkpointer.restore_latest(_abstract(params),
                                                                _abstract(opt_state), None)
  checkpointer.close()
  assert step == 2 and meta["note"] == 2
  _assert_equal(got_params, states[2][0])
  _assert_equal(got_opt, states[2][1])
  assert got_params["w"].sharding.is_equivalent_to(params["w"].sharding, 2)
  loaded, _ = ckpt_lib.load_params(directory, _abstract(params))
  _assert_equal(loaded, states[2][0])


def _damage(directory, step, how):
  files = sorted(f for f in glob.glob(os.path.join(directory, str(step), "params", "**", "*"),
                                      recursive=True)
                 if os.path.isfile(f) and os.path.getsize(f) > 256 and "d/" in f.replace("\\", "/"))
  assert files, "no data file to damage"
  target = files[0]
  data = bytearray(open(target, "rb").read())
  if how == "truncate":
    data = data[: len(data) // 2]
  else:  # flip bits in the middle of the stored values
    for offset in range(len(data) // 2, len(data) // 2 + 8):
      data[offset] ^= 0x5A
  open(target, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_newest_step_falls_back_with_a_warning(saved, how, caplog):
  states, directory = saved
  _damage(directory, 2, how)
  params, opt_state = states[1]
  checkpointer = ckpt_lib.Checkpointer(directory)
  with caplog.at_level("WARNING"):
    step, got_params, _, _ = checkpointer.restore_latest(_abstract(params), _abstract(opt_state),
                                                         None)
  checkpointer.close()
  assert step == 1
  _assert_equal(got_params, states[1][0])
  assert f"skipping checkpoint {os.path.join(directory, '2')}" in caplog.text


def test_checksum_sees_one_flipped_bit():
  x = jnp.asarray(np.random.default_rng(0).standard_normal(1000).astype(np.float32))
  flipped = np.asarray(x).copy()
  flipped.view(np.uint32)[500] ^= 1  # the lowest mantissa bit of one value
  assert ckpt_lib.checksums({"x": x}) != ckpt_lib.checksums({"x": jnp.asarray(flipped)})
  assert ckpt_lib.checksums({"x": x}) == ckpt_lib.checksums({"x": x + 0})


def test_a_parameter_of_another_shape_is_named_before_reading(tmp_path):
  """A checkpoint whose lm_head is [dim, vocab] (the layout before 2026-11-26) or that
  lacks a parameter is refused with a message naming it."""
  rng = np.random.default_rng(0)
  ckpt_lib.save_params(str(tmp_path / "old"), {"lm_head": rng.standard_normal((4, 8))}, {})
  target = {"lm_head": jax.ShapeDtypeStruct((8, 4), jnp.float64)}
  with pytest.raises(ValueError, match=r"lm_head with shape \(4, 8\).*needs \(8, 4\).*"
                                       r"\[vocab, dim\]"):
    ckpt_lib.load_params(str(tmp_path / "old"), target)
  with pytest.raises(ValueError, match="has no parameter embed"):
    ckpt_lib.load_params(str(tmp_path / "old"),
                         dict(target, embed=jax.ShapeDtypeStruct((8, 4), jnp.float32)))
