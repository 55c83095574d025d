"""The real-size configs: their abstract parameters build and their meshes validate."""

import importlib

import jax
import pytest
from flax import nnx

from model import transformer
from model.config import ModelConfig
from parallel import mesh as mesh_lib

# (config module, expected parameters in billions)
REAL = {"llama2_7b": 6.74, "llama3_8b": 8.03}


@pytest.mark.parametrize("name", list(REAL))
def test_real_size_configs_build_and_validate(name):
  module = importlib.import_module(f"configs.{name}")
  for variant in module.MESHES:
    config = module.get_config(variant)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    sizes = {axis: config.mesh[axis] for axis in mesh_lib.AXES}
    mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
    mesh_lib.validate(model_config, mesh, seq_len=config.data.seq_len,
                      batch_size=config.data.batch_size)
    # the levers of configs/base.long_context_levers: with the state split over the ring
    # (fsdp 1), the weights are gathered in bf16
    assert config.train.shard_state_over_sequence == (config.mesh.fsdp == 1)
    assert model_config.gather_in_compute_dtype == config.train.shard_state_over_sequence
  abstract = nnx.eval_shape(lambda: transformer.Transformer(model_config, None,
                                                            rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count == model_config.param_count()
  assert abs(count / 1e9 - REAL[name]) < 0.01


def test_every_program_imports_next_to_the_others():
  """train.py, serve.py and the tools define their flags only when run as programs, so
  one process can import them all (their flags share names)."""
  for name in ("train", "serve", "tools.eval_ppl", "tools.eval_passkey", "tools.copy_probe",
               "tools.convert_hf", "tools.ring_check", "tools.quantize"):
    importlib.import_module(name)
