"""Model configuration: the shape of a Llama-family transformer, its RoPE, its attention.

These dataclasses are the one source of the model's and attention's defaults:
configs/base.py builds its `model` and `attention` sections from them (`defaults`), and
`ModelConfig.from_dict` reads a `model` section back, so configs and code share names.
"""

import dataclasses
import math
from typing import Any, Mapping

from core.errors import ConfigError


SCALING_TYPES = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")
KV_CACHE_DTYPES = ("", "float32", "bfloat16", "int8", "float8_e4m3fn")
QUANTIZE = ("", "int8", "int4")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How RoPE is stretched for context extension (model/rope.py has the formulas).

  none     plain RoPE
  linear   position interpolation: positions / factor
  ntk      NTK-aware: base x factor^(d / (d - 2)), fixed
  dynamic  NTK with the factor taken from the current length (max position + 1)
           once it exceeds original_max_len
  yarn     NTK-by-parts between beta_fast and beta_slow rotations, cos/sin scaled by
           attention_factor (0: 0.1 ln(factor) + 1)
  llama3   Llama 3.1: low frequencies / factor, high kept, a smooth ramp between
           (low_freq_factor, high_freq_factor, original_max_len)
  """
  type: str = "none"
  factor: float = 1.0
  original_max_len: int = 0       # the pre-extension context (dynamic, yarn, llama3)
  low_freq_factor: float = 1.0    # llama3
  high_freq_factor: float = 4.0   # llama3
  beta_fast: float = 32.0         # yarn
  beta_slow: float = 1.0          # yarn
  attention_factor: float = 0.0   # yarn: cos/sin scale; 0 derives it from factor
  truncate: bool = True           # yarn: round the correction range to whole dimensions

  def __post_init__(self):
    field = "model.rope.scaling"
    if self.type not in SCALING_TYPES:
      raise ConfigError(f"{field}.type={self.type!r} does not exist; use one of "
                        f"{', '.join(SCALING_TYPES)}")
    if self.type != "none" and not self.factor > 0:
      raise ConfigError(f"{field}.factor={self.factor} must be > 0 (e.g. new length / old "
                        "length for position interpolation)")
    if self.type in ("dynamic", "yarn", "llama3") and self.original_max_len <= 0:
      raise ConfigError(f"{field}.type={self.type} needs {field}.original_max_len > 0: the "
                        "context length the model was trained at")
    if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
      raise ConfigError(f"{field}.high_freq_factor={self.high_freq_factor} must exceed "
                        f"{field}.low_freq_factor={self.low_freq_factor} > 0")
    if self.type == "yarn" and self.attention_factor < 0:
      raise ConfigError(f"{field}.attention_factor={self.attention_factor} must be >= 0 "
                        "(0: derived from the factor)")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  theta: float = 10_000.0       # the base wavelength; raising it is LWM's extension recipe
  scaling: RopeScaling = RopeScaling()

  def __post_init__(self):
    if not self.theta > 1:
      raise ConfigError(f"model.rope.theta={self.theta} must be > 1 (e.g. 10000, 500000)")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """How attention runs (not part of the model's shape, so not saved with it)."""
  impl: str = "auto"    # auto | xla | pallas_tpu | pallas_gpu (auto: Pallas on TPU/GPU, xla on CPU)
  block_q: int = 0      # query rows per kernel block (0: the kernel's default)
  block_kv: int = 0     # keys per kernel block (0: the kernel's default; TPU: a multiple of 128)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 8192        # V
  dim: int = 256                # M, the model dimension
  n_layers: int = 4
  n_heads: int = 8              # H query heads
  n_kv_heads: int = 2           # K key/value heads (grouped-query attention: H % K == 0)
  head_dim: int = 0             # D; 0: dim // n_heads
  mlp_dim: int = 768            # F, the SwiGLU hidden size
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False        # biases on the q, k, v projections (Qwen2)
  max_seq_len: int = 4096       # longest context the model is meant to serve
  rope: RopeConfig = RopeConfig()
  # Sliding-window attention (Mistral, Qwen2, the local layers of Gemma-2/3): a query at
  # position p sees keys at positions in (p - window, p]; 0: the whole context. Part of
  # what the model computes, so saved with it (a converted model keeps its window).
  window: int = 0
  full_layers: tuple = ()       # with a window: the layers that still see the whole context
  sink_tokens: int = 0          # with a window: the first positions stay visible (StreamingLLM)
  dtype: str = "float32"        # compute dtype of activations and matmuls (bfloat16 on TPU/GPU)
  param_dtype: str = "float32"  # storage dtype of parameters (master weights)
  # The KV cache's dtype when decoding (KV_CACHE_DTYPES): "" (dtype; serving on CPU keeps
  # a bfloat16 model's cache in float32: serving/loading.py), float32, bfloat16, or int8 /
  # float8_e4m3fn (one float32 scale per token and kv head: about half of bfloat16's
  # bytes; model/kv_cache.py).
  kv_cache_dtype: str = ""
  remat: str = "none"           # none | full | dots: recompute blocks in the backward pass
  # Weights stored quantized (model/quantize.py, QUANTIZE): "" (param_dtype), "int8" (one
  # scale per output channel) or "int4" (one scale per `quantize_group` input channels of
  # each output channel). Serving only; serve.quantize sets it, a quantized checkpoint
  # (tools/quantize.py: round to nearest, GPTQ or AWQ) keeps it.
  quantize: str = ""
  quantize_group: int = 128
  # Training's output head and loss, this many tokens per device at a time (0: all at
  # once): the [tokens, V] float32 logits then exist one chunk at a time, recomputed in
  # the backward pass (model/loss.chunked_target_log_probs).
  head_chunk: int = 0
  # Weights cast to `dtype` before a projection gathers them (over fsdp, or over the
  # ring with train.shard_state_over_sequence): float32 master weights then travel and
  # are held gathered in bf16, half the bytes; their gradients come back rounded to
  # bf16 before GSPMD sums them into the master's layout. False: gathered as stored.
  gather_in_compute_dtype: bool = False
  init_std: float = 0.02

  def __post_init__(self):
    if self.head_dim == 0:
      if self.dim % self.n_heads:
        raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads="
                          f"{self.n_heads}; set model.head_dim explicitly or change one")
      object.__setattr__(self, "head_dim", self.dim // self.n_heads)
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads="
                        f"{self.n_kv_heads} (grouped-query attention)")
    if self.remat not in ("none", "full", "dots"):
      raise ConfigError(f"model.remat={self.remat!r}; use one of none, full, dots")
    if self.kv_cache_dtype not in KV_CACHE_DTYPES:
      raise ConfigError(f"model.kv_cache_dtype={self.kv_cache_dtype!r}; use one of "
                        f"{', '.join(KV_CACHE_DTYPES[1:])} (or \"\": model.dtype)")
    if self.quantize not in QUANTIZE:
      raise ConfigError(f"model.quantize={self.quantize!r}; use int8, int4 or \"\" (the "
                        "parameter dtype)")
    self._check_quantize_group()
    if self.head_chunk < 0:
      raise ConfigError(f"model.head_chunk={self.head_chunk} must be >= 0 (0: no chunks)")
    self._check_window()

  def _check_quantize_group(self):
    """int4's groups must tile every weight's input channels: dim, mlp_dim and
    n_heads * head_dim (wo's)."""
    if self.quantize != "int4":
      return
    sizes = (self.dim, self.mlp_dim, self.n_heads * self.head_dim)
    group = self.quantize_group
    if group <= 0 or any(size % group for size in sizes):
      works = math.gcd(128, *sizes)
      raise ConfigError(f"model.quantize_group={group} must divide the input channels of "
                        f"every weight {sizes}; use {works}")

  def _check_window(self):
    if self.window < 0:
      raise ConfigError(f"model.window={self.window} must be >= 0 (0: attend to the whole "
                        "context; e.g. 4096 for Mistral-7B-v0.1)")
    if self.sink_tokens < 0 or (self.sink_tokens and not self.window):
      raise ConfigError(f"model.sink_tokens={self.sink_tokens} needs model.window > 0 and must "
                        "be >= 0 (sinks keep the first tokens visible past the window); set "
                        "model.sink_tokens=0")
    full = tuple(int(layer) for layer in self.full_layers)
    object.__setattr__(self, "full_layers", full)
    if full and not self.window:
      raise ConfigError(f"model.full_layers={full} names layers exempt from a window, but "
                        "model.window=0; set model.window or model.full_layers=()")
    bad = [layer for layer in full if not 0 <= layer < self.n_layers]
    if bad or len(set(full)) != len(full):
      raise ConfigError(f"model.full_layers={full}: each a distinct layer index in [0, "
                        f"{self.n_layers}) (model.n_layers={self.n_layers})")

  @property
  def windowed_everywhere(self) -> bool:
    """Every layer has the sliding window (none is in full_layers)."""
    return bool(self.window) and not self.full_layers

  def layer_window(self, layer: int) -> int:
    """The sliding window of `layer` (0: it sees the whole context)."""
    return 0 if layer in self.full_layers else self.window

  def layer_sinks(self, layer: int) -> int:
    """The sink tokens of `layer` (0 without a window)."""
    return self.sink_tokens if self.layer_window(layer) else 0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d)
    rope = dict(d.pop("rope", {}))
    scaling = RopeScaling(**dict(rope.pop("scaling", {})))
    return cls(rope=RopeConfig(scaling=scaling, **rope), **d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def param_count(self, include_embeddings: bool = True) -> int:
    attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    mlp = 3 * self.dim * self.mlp_dim
    bias = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim if self.qkv_bias else 0
    per_layer = attn + bias + mlp + 2 * self.dim
    total = self.n_layers * per_layer + self.dim
    if include_embeddings:
      total += self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
    return total

  def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs (forward + backward) per token at `seq_len`, for MFU.

    6 per parameter of the matmuls (the output head included, the embedding lookup
    not) plus attention: 4·L·H·Dh per token forward (QKᵀ and PV), ×3 with backward,
    halved when causal.
    """
    matmul_params = self.param_count(include_embeddings=False) + self.vocab_size * self.dim
    attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
    return 6 * matmul_params + attention * (0.5 if causal else 1.0)


def defaults(cls) -> dict:
  """The declared defaults of a config dataclass as a nested dict (nested dataclasses
  become dicts): what configs/base.py starts from. Declared, not derived: ModelConfig's
  head_dim stays 0 here, although an instance fills it in."""
  values = {}
  for field in dataclasses.fields(cls):
    value = field.default
    values[field.name] = (defaults(type(value)) if dataclasses.is_dataclass(value)
                          else value)
  return values
