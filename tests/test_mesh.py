"""Each mesh/config divisibility rule fails early with a message that says what to change."""

import dataclasses

import pytest

from model.config import ConfigError, ModelConfig
from parallel import mesh as mesh_lib

MODEL = ModelConfig(vocab_size=256, dim=64, n_layers=1, n_heads=8, n_kv_heads=2, mlp_dim=128)


def test_fill_axis_takes_remaining_devices():
  mesh = mesh_lib.make_mesh({"data": 2, "sequence": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}


@pytest.mark.parametrize("sizes, message", [
    ({"sequence": 3}, "mesh.sequence=3 does not divide the 8 devices; use one of [1, 2, 4, 8]"),
    ({"data": 2, "sequence": 2}, "data*fsdp*sequence*tensor = 4 but there are 8 devices"),
    ({"data": -1, "sequence": -1}, "only one axis may be -1"),
    ({"tensor": 0}, "mesh.tensor=0 must be a positive size or -1"),
])
def test_bad_mesh_shapes(sizes, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("*", r"\*")):
    mesh_lib.make_mesh(sizes)


@pytest.mark.parametrize("sizes, model_changes, kwargs, message", [
    ({"sequence": 4, "data": 2}, {}, {"seq_len": 1020},
     "data.seq_len=1020 must be a multiple of 2*mesh.sequence=8 (zigzag layout); e.g. 1016 or 1024"),
    ({"tensor": 4, "data": 2}, {}, {}, "model.n_kv_heads=2 is not divisible by mesh.tensor=4"),
    ({"data": 4, "sequence": 2}, {}, {"batch_size": 2}, "global batch 2 < data*fsdp = 4"),
    ({"data": 2, "fsdp": 2, "sequence": 2}, {}, {"batch_size": 6},
     "data.batch_size=6 must be a multiple of mesh.data*mesh.fsdp=4"),
    ({"tensor": 8}, {"n_heads": 8, "n_kv_heads": 8, "mlp_dim": 100}, {},
     "model.mlp_dim=100 must be a multiple of mesh.tensor=8"),
    ({"fsdp": 8}, {"dim": 60, "n_heads": 6, "n_kv_heads": 2}, {},
     "model.dim=60 must be a multiple of mesh.fsdp=8"),
])
def test_validation_rules(sizes, model_changes, kwargs, message):
  model = dataclasses.replace(MODEL, **model_changes)
  mesh = mesh_lib.make_mesh(sizes)
  with pytest.raises(ConfigError) as error:
    mesh_lib.validate(model, mesh, **kwargs)
  assert message in str(error.value)


def test_valid_setup_passes():
  mesh_lib.validate(MODEL, mesh_lib.make_mesh({"data": 2, "sequence": 2, "tensor": 2}),
                    seq_len=1024, batch_size=4)


def test_model_config_rules():
  with pytest.raises(ConfigError, match="model.n_heads=6 must be a multiple of model.n_kv_heads=4"):
    ModelConfig(dim=96, n_heads=6, n_kv_heads=4)
  with pytest.raises(ConfigError, match="model.remat='some'"):
    ModelConfig(remat="some")
