"""tools/convert_hf.py: random tiny transformers models in, logits equal, and back out.

Every model is built by transformers itself (torch CPU, seeded) with every parameter
randomised (norm scales and Qwen2's biases too, which transformers initialises to
constants), saved with save_pretrained, converted, and run by ringlm.
"""

import json
import logging
import os

import numpy as np
import pytest

import torch
import transformers

from model import hf, transformer
from parallel import mesh as mesh_lib
from tools import convert_hf

logging.getLogger("transformers").setLevel(logging.ERROR)
VOCAB = 160
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-6)
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
             "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}


def make_hf_model(directory, architecture="LlamaForCausalLM", rope="default", seed=0,
                  dtype=torch.float32, **extra):
  """A random transformers model saved in `directory`; returns the model (eval mode)."""
  max_shard_size = extra.pop("max_shard_size", "5GB")
  torch.manual_seed(seed)
  config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
  config = config_class(**dict(SHAPE, rope_parameters=dict(ROPES[rope]), **extra))
  model = getattr(transformers, architecture)(config).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "norm" in name:
        parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
      else:
        parameter.normal_(0, 0.1)
  model = model.to(dtype)
  model.save_pretrained(directory, max_shard_size=max_shard_size)
  return model


def tokens(length, batch=2, seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def hf_logits(model, token_ids):
  with torch.no_grad():
    return model(torch.from_numpy(token_ids).long()).logits.float().numpy()


def ringlm_logits(run_dir, mesh, token_ids):
  model, _ = transformer.load(run_dir, mesh)
  positions = np.broadcast_to(np.arange(token_ids.shape[1], dtype=np.int32), token_ids.shape)
  return np.asarray(model(token_ids, np.ascontiguousarray(positions)))


CASES = {  # name: (architecture, rope, extra config, lengths)
    "llama": ("LlamaForCausalLM", "default", {}, (16, 40, 97)),
    "llama-linear": ("LlamaForCausalLM", "linear", {}, (100,)),
    "llama-dynamic": ("LlamaForCausalLM", "dynamic", {}, (40, 100)),
    "llama-yarn": ("LlamaForCausalLM", "yarn", {}, (100,)),
    "llama-llama3": ("LlamaForCausalLM", "llama3", {}, (100,)),
    "llama-tied": ("LlamaForCausalLM", "default", {"tie_word_embeddings": True}, (33,)),
    # Mistral with a head_dim that is not hidden / heads; Qwen2 with q/k/v biases
    "mistral": ("MistralForCausalLM", "default", {"head_dim": 32, "sliding_window": None}, (48,)),
    "qwen2": ("Qwen2ForCausalLM", "yarn", {"tie_word_embeddings": True}, (48,)),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """name -> (transformers model, ringlm run directory), converted once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      architecture, rope, extra, _ = CASES[name]
      root = tmp_path_factory.mktemp(name)
      model = make_hf_model(str(root / "hf"), architecture, rope, **extra)
      assert convert_hf.main([f"--hf_dir={root / 'hf'}", f"--out={root / 'run'}"]) == 0
      cache[name] = (model, str(root / "run"))
    return cache[name]
  return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_equal_transformers(name, converted, single_device_mesh):
  model, run_dir = converted(name)
  for length in CASES[name][3]:
    token_ids = tokens(length)
    diff = np.abs(ringlm_logits(run_dir, single_device_mesh, token_ids)
                  - hf_logits(model, token_ids)).max()
    assert diff <= 1e-4, (name, length, diff)


def test_logits_equal_transformers_on_a_sequence_sharded_mesh(converted):
  model, run_dir = converted("llama-yarn")
  token_ids = tokens(96)
  mesh = mesh_lib.make_mesh({"data": 2, "sequence": 4})
  diff = np.abs(ringlm_logits(run_dir, mesh, token_ids)
                - hf_logits(model, token_ids)).max()
  assert diff <= 1e-4


def test_old_config_form_and_sharded_safetensors(tmp_path, single_device_mesh):
  """config.json as older transformers wrote it (rope_theta, rope_scaling with "type",
  torch_dtype) and weights split over several files with an index."""
  model = make_hf_model(str(tmp_path / "hf"), rope="linear", max_shard_size="100KB")
  assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
  with open(tmp_path / "hf" / "config.json") as f:
    config = json.load(f)
  params = config.pop("rope_parameters")
  config.update(rope_theta=params["rope_theta"], torch_dtype=config.pop("dtype"),
                rope_scaling={"type": "linear", "factor": params["factor"]})
  with open(tmp_path / "hf" / "config.json", "w") as f:
    json.dump(config, f)
  assert convert_hf.main([f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'run'}"]) == 0
  token_ids = tokens(100)
  diff = np.abs(ringlm_logits(str(tmp_path / "run"), single_device_mesh, token_ids)
                - hf_logits(model, token_ids)).max()
  assert diff <= 1e-4


def _tensors(directory):
  from safetensors.torch import load_file
  return {name: tensor for file in sorted(os.listdir(directory)) if file.endswith(".safetensors")
          for name, tensor in load_file(os.path.join(directory, file)).items()}


@pytest.mark.parametrize("name", ["qwen2", "llama-llama3"])
def test_round_trip_gives_identical_tensors_and_logits(name, converted, tmp_path):
  model, run_dir = converted(name)
  out = tmp_path / "back"
  assert convert_hf.main(["--to_hf", f"--checkpoint={run_dir}", f"--out={out}",
                          "--max_shard_gb=0.0001"]) == 0  # ~100 KB: sharded output
  assert os.path.exists(out / "model.safetensors.index.json")
  original, back = _tensors(os.path.dirname(run_dir) + "/hf"), _tensors(out)
  assert set(back) == set(original)
  for key, tensor in original.items():
    assert torch.equal(back[key], tensor), key
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert type(reloaded) is type(model)
  # the same model as ringlm reads it (the export spells out yarn's default betas)
  assert (hf.model_config_from_hf(reloaded.config.to_dict())
          == hf.model_config_from_hf(model.config.to_dict()))
  token_ids = tokens(40)
  np.testing.assert_array_equal(hf_logits(reloaded, token_ids), hf_logits(model, token_ids))


def test_bfloat16_is_kept_and_round_trips(tmp_path):
  make_hf_model(str(tmp_path / "hf"), dtype=torch.bfloat16)
  assert convert_hf.main([f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'run'}"]) == 0
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["model"]["param_dtype"] == "bfloat16"
  assert convert_hf.main(["--to_hf", f"--checkpoint={tmp_path / 'run'}",
                          f"--out={tmp_path / 'back'}"]) == 0
  original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
  assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], t)
             for k, t in original.items())


def test_extended_model_exports_its_rope_scaling():
  """A ringlm model extended with PI / NTK keeps its RoPE in transformers' form."""
  from model.config import ModelConfig, RopeConfig, RopeScaling
  config = ModelConfig(rope=RopeConfig(scaling=RopeScaling(type="linear", factor=4.0)))
  assert hf.hf_config_from_model(config)["rope_parameters"] == {
      "rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}
  ntk = ModelConfig(head_dim=32, rope=RopeConfig(scaling=RopeScaling(type="ntk", factor=4.0)))
  assert hf.hf_config_from_model(ntk)["rope_parameters"]["rope_theta"] == pytest.approx(
      10000.0 * 4.0 ** (32 / 30))


def _break(directory, kind):
  """Damages a saved HF model in one way; returns the message conversion must give."""
  config_path = os.path.join(directory, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  if kind == "missing tensor":
    from safetensors.torch import load_file, save_file
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    return "tensor model.layers.1.mlp.up_proj.weight is missing"
  if kind == "wrong shape":
    config["intermediate_size"] = 128
    message = "tensor model.layers.0.mlp.gate_proj.weight has shape [96, 64]; config.json " \
              "implies [128, 64]"
  elif kind == "architecture":
    config["architectures"] = ["GPT2LMHeadModel"]
    message = "architectures=['GPT2LMHeadModel']: supported are"
  elif kind == "rope type":
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    message = "rope_parameters.rope_type='longrope' is not supported"
  with open(config_path, "w") as f:
    json.dump(config, f)
  return message


@pytest.mark.parametrize("kind", ["missing tensor", "wrong shape", "architecture", "rope type"])
def test_bad_input_is_one_message_and_writes_nothing(kind, tmp_path, capsys):
  make_hf_model(str(tmp_path / "hf"))
  message = _break(str(tmp_path / "hf"), kind)
  assert convert_hf.main([f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'run'}"]) == 2
  assert message in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no output, no temporary left behind


def test_existing_output_and_missing_checkpoint_are_refused(tmp_path, capsys):
  (tmp_path / "taken").mkdir()
  assert convert_hf.main(["--hf_dir=x", f"--out={tmp_path / 'taken'}"]) == 2
  assert "exists; choose a new directory" in capsys.readouterr().err
  assert convert_hf.main(["--to_hf", f"--checkpoint={tmp_path / 'none'}",
                          f"--out={tmp_path / 'out'}"]) == 2
  assert "--checkpoint: no checkpoint in" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["taken"]
