"""Hugging Face Llama-family models <-> ringlm: the config fields and the tensor layout.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases).
Both config.json forms are read: the older `rope_theta` / `rope_scaling` /
`torch_dtype` and the newer `rope_parameters` / `dtype`; the newer one is written.

Tensors (dimension letters: core/__init__.py). transformers stores a Linear as
[out, in]; ringlm keeps heads explicit:
  q_proj [H·D, M] -> wq [M, H, D]          o_proj [M, H·D] -> wo [H, D, M]
  k/v_proj [K·D, M] -> wk/wv [M, K, D]     q bias [H·D] -> bq [H, D], k/v [K·D] -> [K, D]
  gate/up_proj [F, M] -> w_gate/w_up [M, F]    down_proj [M, F] -> w_down [F, M]
  lm_head, embed_tokens [V, M], norms: as they are
RoPE needs no permutation: ringlm rotates halves as transformers does.

Sliding windows (model.window, model.full_layers; transformers' mask: a query at p sees
keys in (p - sliding_window, p]):
  Mistral   sliding_window on every layer (None: none)
  Qwen2     use_sliding_window + sliding_window on the layers whose `layer_types` entry
            is "sliding_attention" (without layer_types: layers >= max_window_layers)
  Llama     none (transformers ignores a sliding_window there, and so does ringlm); a
            Llama-shaped ringlm model with a window on every layer exports as Mistral
Layer types other than full and sliding attention, and attention sinks, have no form
here and are refused.
"""

import math

import numpy as np

from model.config import ConfigError, ModelConfig, RopeConfig, RopeScaling

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
DTYPES = ("float32", "bfloat16", "float16")


class ConversionError(ValueError):
  """A model that cannot be converted; the message names the tensor or field."""


# --------------------------------------------------------------------------- config

def _rope_from_hf(hf: dict, head_dim: int) -> RopeConfig:
  """RopeConfig from either config.json form."""
  if "rope_parameters" in hf and hf["rope_parameters"]:
    where, params = "rope_parameters", dict(hf["rope_parameters"])
  else:
    where, params = "rope_scaling", dict(hf.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ConversionError(f"{where}.partial_rotary_factor="
                          f"{params.get('partial_rotary_factor')}: partial RoPE is not supported")
  max_len = int(hf.get("max_position_embeddings", 0) or 0)
  factor = params.get("factor")
  try:
    if kind == "default":
      scaling = RopeScaling()
    elif kind == "linear":
      scaling = RopeScaling(type="linear", factor=float(factor))
    elif kind == "dynamic":  # transformers grows past max_position_embeddings
      scaling = RopeScaling(type="dynamic", factor=float(factor), original_max_len=max_len)
    elif kind == "yarn":
      original = int(params.get("original_max_position_embeddings") or max_len)
      factor = float(factor) if factor is not None else max_len / original
      attention = params.get("attention_factor")
      mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
      if attention is None and mscale and mscale_all_dim and factor > 1:  # DeepSeek's form
        attention = ((0.1 * mscale * math.log(factor) + 1)
                     / (0.1 * mscale_all_dim * math.log(factor) + 1))
      scaling = RopeScaling(type="yarn", factor=factor, original_max_len=original,
                            beta_fast=float(params.get("beta_fast") or 32),
                            beta_slow=float(params.get("beta_slow") or 1),
                            attention_factor=float(attention or 0.0),
                            truncate=bool(params.get("truncate", True)))
    elif kind == "llama3":
      scaling = RopeScaling(type="llama3", factor=float(factor),
                            original_max_len=int(params["original_max_position_embeddings"]),
                            low_freq_factor=float(params["low_freq_factor"]),
                            high_freq_factor=float(params["high_freq_factor"]))
    else:
      raise ConversionError(f"{where}.rope_type={kind!r} is not supported; ringlm converts "
                            "default, linear, dynamic, yarn and llama3")
  except (KeyError, TypeError) as error:
    raise ConversionError(f"{where} ({kind}) lacks or mistypes a field: {error}") from None
  except ConfigError as error:
    raise ConversionError(f"{where}: {error}") from None
  return RopeConfig(theta=theta, scaling=scaling)


LAYER_TYPES = ("full_attention", "sliding_attention")


def _window_from_hf(hf: dict, architecture: str) -> dict:
  """The model.window / model.full_layers fields, as transformers applies the config."""
  layers = int(hf["num_hidden_layers"])
  if architecture == "LlamaForCausalLM":
    return {}
  window = hf.get("sliding_window")
  if architecture == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
    window = None
  if window is None:
    return {}
  if not isinstance(window, int) or window <= 0:
    raise ConversionError(f"sliding_window={window!r}: expected a positive number of tokens "
                          "or null")
  if architecture == "MistralForCausalLM":  # every layer (transformers ignores layer_types)
    return {"window": window}
  types = hf.get("layer_types")
  if types is None:
    start = int(hf.get("max_window_layers", layers))
    types = ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
  unknown = sorted(set(types) - set(LAYER_TYPES))
  if unknown or len(types) != layers:
    raise ConversionError(f"layer_types={types}: ringlm converts one entry per layer, each one "
                          f"of {', '.join(LAYER_TYPES)}")
  full = tuple(i for i, kind in enumerate(types) if kind == "full_attention")
  return {} if len(full) == layers else {"window": window, "full_layers": full}


def _window_to_hf(config: ModelConfig, architecture: str) -> dict:
  """config.json's window fields for `architecture` (the inverse of _window_from_hf)."""
  if config.sink_tokens:
    raise ConversionError(f"model.sink_tokens={config.sink_tokens}: transformers has no "
                          "attention sinks for these architectures; export without them")
  if architecture == "LlamaForCausalLM":
    if config.window:  # with full_layers (a window on every layer exports as Mistral)
      raise ConversionError(f"model.window={config.window} with model.full_layers="
                            f"{config.full_layers}: per-layer windows exist in transformers' "
                            "Qwen2ForCausalLM, which has q/k/v biases this model lacks; export "
                            "with the window on every layer (model.full_layers=()) or none")
    return {}
  if architecture == "MistralForCausalLM":
    if config.full_layers:
      raise ConversionError(f"model.full_layers={config.full_layers}: MistralForCausalLM "
                            "windows every layer; Qwen2ForCausalLM has per-layer windows")
    return {"sliding_window": config.window or None}
  types = ["full_attention" if not config.layer_window(i) else "sliding_attention"
           for i in range(config.n_layers)]
  leading_full = next((i for i, kind in enumerate(types) if kind != "full_attention"),
                      config.n_layers)
  return {"use_sliding_window": bool(config.window), "sliding_window": config.window or None,
          "max_window_layers": leading_full, "layer_types": types}


def model_config_from_hf(hf: dict, dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """(ModelConfig, facts ringlm keeps about the origin) from a config.json dict."""
  architectures = hf.get("architectures") or []
  if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
    raise ConversionError(f"architectures={architectures}: supported are "
                          f"{', '.join(ARCHITECTURES)}")
  architecture = architectures[0]
  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"hidden_act={hf['hidden_act']!r}: only silu (SwiGLU) is supported")
  if architecture != "Qwen2ForCausalLM" and hf.get("attention_bias"):
    raise ConversionError("attention_bias=true: biases on the attention output projection are "
                          "not supported (Qwen2's q/k/v biases are)")
  if hf.get("mlp_bias"):
    raise ConversionError("mlp_bias=true: MLP biases are not supported")
  dtype = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
  if dtype not in DTYPES:
    raise ConversionError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)} (--dtype)")
  try:
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    config = ModelConfig(
        vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
        mlp_dim=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=architecture == "Qwen2ForCausalLM",
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        rope=_rope_from_hf(hf, head_dim), dtype=dtype, param_dtype=dtype,
        **_window_from_hf(hf, architecture))
  except KeyError as error:
    raise ConversionError(f"config.json lacks the field {error.args[0]}") from None
  except ConfigError as error:
    raise ConversionError(str(error)) from None
  origin = {"architecture": architecture, "model_type": ARCHITECTURES[architecture],
            "bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id")}
  return config, origin


def hf_config_from_model(config: ModelConfig, origin: dict | None = None) -> dict:
  """config.json (the form current transformers writes) for a ringlm model."""
  origin = origin or {}
  architecture = origin.get("architecture") or ("Qwen2ForCausalLM" if config.qkv_bias
                                                else "LlamaForCausalLM")
  if architecture == "LlamaForCausalLM" and config.windowed_everywhere:
    architecture = "MistralForCausalLM"  # Llama's tensors, a window on every layer
  if config.qkv_bias and architecture != "Qwen2ForCausalLM":
    raise ConversionError(f"model.qkv_bias=True has no {architecture} form; Qwen2 has it")
  rope, scaling = config.rope, config.rope.scaling
  max_len = config.max_seq_len
  params = {"rope_theta": rope.theta, "rope_type": "default"}
  if scaling.type == "linear":
    params.update(rope_type="linear", factor=scaling.factor)
  elif scaling.type == "ntk":  # a fixed NTK stretch is plain RoPE with a larger base
    params["rope_theta"] = rope.theta * scaling.factor ** (config.head_dim / (config.head_dim - 2))
  elif scaling.type == "dynamic":  # transformers reads the original length here
    params.update(rope_type="dynamic", factor=scaling.factor)
    max_len = scaling.original_max_len
  elif scaling.type == "yarn":
    params.update(rope_type="yarn", factor=scaling.factor,
                  original_max_position_embeddings=scaling.original_max_len,
                  beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow,
                  truncate=scaling.truncate)
    if scaling.attention_factor:
      params["attention_factor"] = scaling.attention_factor
  elif scaling.type == "llama3":
    params.update(rope_type="llama3", factor=scaling.factor,
                  original_max_position_embeddings=scaling.original_max_len,
                  low_freq_factor=scaling.low_freq_factor,
                  high_freq_factor=scaling.high_freq_factor)
  hf = {"architectures": [architecture], "model_type": ARCHITECTURES[architecture],
        "vocab_size": config.vocab_size, "hidden_size": config.dim,
        "intermediate_size": config.mlp_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "max_position_embeddings": max_len,
        "rope_parameters": params, "dtype": config.param_dtype,
        "bos_token_id": origin.get("bos_token_id"), "eos_token_id": origin.get("eos_token_id")}
  if architecture == "LlamaForCausalLM":
    hf.update(attention_bias=False, mlp_bias=False)
  hf.update(_window_to_hf(config, architecture))
  return hf


# --------------------------------------------------------------------------- tensors

def tensor_map(config: ModelConfig) -> list[tuple[str, tuple, str]]:
  """(Hugging Face name, ringlm parameter path, layout) of every tensor.

  Layouts: "copy", "linear" ([out, in] <-> [in, out]), "in_heads" (q/k/v), "out_heads"
  (o_proj), "bias_heads" (q/k/v biases); `to_ringlm` / `to_hf` apply them.
  """
  entries = [("model.embed_tokens.weight", ("embed",), "copy"),
             ("model.norm.weight", ("final_norm", "scale"), "copy")]
  if not config.tie_embeddings:
    entries.append(("lm_head.weight", ("lm_head",), "copy"))
  for i in range(config.n_layers):
    hf, ours = f"model.layers.{i}.", ("blocks", i)
    entries += [
        (hf + "input_layernorm.weight", ours + ("attn_norm", "scale"), "copy"),
        (hf + "post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), "copy"),
        (hf + "self_attn.q_proj.weight", ours + ("attn", "wq"), "in_heads"),
        (hf + "self_attn.k_proj.weight", ours + ("attn", "wk"), "in_heads"),
        (hf + "self_attn.v_proj.weight", ours + ("attn", "wv"), "in_heads"),
        (hf + "self_attn.o_proj.weight", ours + ("attn", "wo"), "out_heads"),
        (hf + "mlp.gate_proj.weight", ours + ("mlp", "w_gate"), "linear"),
        (hf + "mlp.up_proj.weight", ours + ("mlp", "w_up"), "linear"),
        (hf + "mlp.down_proj.weight", ours + ("mlp", "w_down"), "linear")]
    if config.qkv_bias:
      entries += [(hf + f"self_attn.{p}_proj.bias", ours + ("attn", f"b{p}"), "bias_heads")
                  for p in "qkv"]
  return entries


def to_ringlm(array: np.ndarray, layout: str, shape: tuple) -> np.ndarray:
  """A Hugging Face tensor in ringlm's layout `shape`."""
  if layout in ("copy", "bias_heads"):
    return array.reshape(shape)
  if layout == "linear":
    return array.T
  if layout in ("in_heads", "out_heads"):  # [H·D, M] -> [M, H, D]; [M, H·D] -> [H, D, M]
    return array.T.reshape(shape)
  raise AssertionError(layout)


def hf_shape(layout: str, shape: tuple) -> tuple:
  """The Hugging Face shape of a ringlm parameter of `shape`."""
  if layout == "copy":
    return tuple(shape)
  if layout == "bias_heads":
    return (shape[0] * shape[1],)
  if layout == "linear":
    return (shape[1], shape[0])
  if layout == "in_heads":
    return (shape[1] * shape[2], shape[0])
  if layout == "out_heads":
    return (shape[2], shape[0] * shape[1])
  raise AssertionError(layout)


def to_hf(array: np.ndarray, layout: str) -> np.ndarray:
  """A ringlm parameter in Hugging Face's layout."""
  shape = hf_shape(layout, array.shape)
  if layout in ("copy", "bias_heads"):
    return array.reshape(shape)
  if layout == "linear":
    return array.T
  if layout in ("in_heads", "out_heads"):  # [M, H, D] -> [H·D, M]; [H, D, M] -> [M, H·D]
    return array.reshape(shape[1], shape[0]).T
  raise AssertionError(layout)
