"""Calibrated quantization: GPTQ and AWQ, from a few hundred tokens of the model's inputs.

  model = calibration.quantize(float_model, config, tokens, "gptq")   # or "awq", "rtn"

Round to nearest (model/quantize.py) rounds every weight alone. These two look at what
each projection is fed, recorded from one forward of the float model over `tokens`
(transformer.recording_inputs), and store the same values and scales, so serving does
not change:

  GPTQ (Frantar et al., 2022) rounds a weight's input channels one at a time and
    moves each one's rounding error onto the channels not yet rounded, in the direction
    that costs least on the recorded inputs X: with H = X^T X (1% of its mean diagonal
    added) and U the upper Cholesky factor of H^-1, rounding channel i with error e
    subtracts e / U[i, i] * U[i, i:] from the remaining channels of every output. In
    blocks of 128 channels (updates to later blocks applied once per block); with
    groups, a group's scale is set from the updated weights when its first channel
    is reached.
  AWQ (Lin et al., 2023) multiplies each input channel of a group of projections by
    s = mean|x|^a / sqrt(max * min) and divides what produces that input by s: the
    RMSNorm scale before wq/wk/wv, w_gate/w_up and lm_head, the value projection
    before wo (s shared by the query heads of a kv head), the up projection before
    w_down. The float model is unchanged; channels that carry large activations lose
    less to rounding. a is the best of 0, 0.05, ..., 0.95 by the group's output error
    after rounding (a = 0 is round to nearest), then every weight is rounded to
    nearest.

Simplifications, said: every layer's inputs come from the float model's forward (the
papers feed each layer the already-quantized layers' outputs); no act-order for GPTQ;
no clipping search for AWQ. The embedding (a lookup) and a head tied to it are rounded
to nearest.

Arrays here are NumPy, float64 for the algebra: this is an offline step
(tools/quantize.py) on one host.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import quantize as quantize_lib
from model import transformer
from parallel import quantized

METHODS = ("rtn", "gptq", "awq")
AWQ_GRID = 20
GPTQ_BLOCK = 128
GPTQ_DAMPENING = 0.01

# The recorded input each projection reads (transformer.PROJECTION_INPUTS inverted).
INPUT_OF = {name: source for source, names in transformer.PROJECTION_INPUTS.items()
            for name in names}


def projection_inputs(model, tokens) -> dict[str, list[np.ndarray]]:
  """{name of transformer.PROJECTION_INPUTS: per call (layer) [B * L, in] float32} of
  one forward of `model` (a float Transformer) over `tokens` [B, L] int32 at positions
  0..L-1, on the model's mesh."""
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(tokens, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

  @jax.jit
  def run(state):
    with transformer.recording_inputs() as recorded:
      nnx.merge(graphdef, state)(tokens, positions)
    return recorded

  return {name: [np.asarray(x, np.float32).reshape(tokens.size, -1) for x in inputs]
          for name, inputs in run(state).items()}


def matrix(weight: np.ndarray, name: str) -> np.ndarray:
  """[outputs, inputs] view of a weight named `name` (quantize.IN_AXES): its output
  channels in order by its input channels flattened in order."""
  in_axes = quantize_lib.IN_AXES[name]
  first, last = in_axes[0], in_axes[-1]
  size = math.prod(weight.shape[first:last + 1])
  flat = weight.reshape(weight.shape[:first] + (size,) + weight.shape[last + 1:])
  return np.moveaxis(flat, first, -1).reshape(-1, size)


def _unmatrix(rows: np.ndarray, shape: tuple, name: str) -> np.ndarray:
  """`matrix`'s inverse for a [outputs, k] array: shape[:first] + (k,) + shape[last + 1:]
  (the values when k is all inputs, a grouped scale's layout when k is the groups)."""
  in_axes = quantize_lib.IN_AXES[name]
  first, last = in_axes[0], in_axes[-1]
  rest = shape[:first] + shape[last + 1:]
  return np.moveaxis(rows.reshape(rest + (rows.shape[1],)), -1, first)


def _stored(values: np.ndarray, scales: np.ndarray, shape: tuple, name: str, dtype: str,
            group: int):
  """(values, scale) in model/quantize.py's layout from [outputs, inputs] values and
  [outputs, groups] scales (one column without groups)."""
  in_axes = quantize_lib.IN_AXES[name]
  stored = _unmatrix(values, shape, name).reshape(shape)
  if group:
    scale = _unmatrix(scales, shape, name)
  else:
    scale = scales[:, 0].reshape(shape[:in_axes[0]] + shape[in_axes[-1] + 1:])
  return (jnp.asarray(stored.astype(np.int8)).astype(quantize_lib.DTYPES[dtype]),
          jnp.asarray(scale, jnp.float32))


def _largest(dtype: str) -> float:
  return quantized.LARGEST[jnp.dtype(quantize_lib.DTYPES[dtype])]


def round_to_nearest(rows: np.ndarray, dtype: str, group: int) -> np.ndarray:
  """The dequantized [outputs, inputs] matrix `rows` rounded to nearest (float64), one
  scale per row or per `group` inputs of a row: what quantize.quantize_weight stores."""
  largest = _largest(dtype)
  grouped = rows.reshape(rows.shape[0], -1, group or rows.shape[1])
  scale = np.abs(grouped).max(-1, keepdims=True) / largest
  safe = np.where(scale == 0, 1.0, scale)
  return (np.clip(np.round(grouped / safe), -largest, largest) * scale).reshape(rows.shape)


def gptq(weight, name: str, hessian: np.ndarray, dtype: str, group: int,
         block: int = GPTQ_BLOCK, dampening: float = GPTQ_DAMPENING):
  """(values, float32 scale) of `weight` (named `name`, a key of quantize.IN_AXES) in
  quantize.quantize_weight's layout, chosen by GPTQ (module docstring) for inputs whose
  second moments are `hessian` [inputs, inputs] (X^T X / N, inputs flattened as
  `matrix` orders them)."""
  shape = np.shape(weight)
  w = matrix(np.array(weight, np.float64), name).copy()  # [O, I], ours to change
  outputs, inputs = w.shape
  largest = _largest(dtype)
  h = np.array(hessian, np.float64)
  dead = np.diag(h) == 0  # inputs never active: any value costs nothing; store 0
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  h[np.diag_indices(inputs)] += dampening * np.mean(np.diag(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U

  values = np.zeros_like(w)
  scales = np.zeros((outputs, inputs // group if group else 1))
  if not group:
    scales[:, 0] = np.abs(w).max(1) / largest
  step = max(block // group, 1) * group if group else block  # whole groups per block
  for start in range(0, inputs, step):
    end = min(start + step, inputs)
    w_block, errors, u_block = w[:, start:end].copy(), np.zeros((outputs, end - start)), \
        u[start:end, start:end]
    for i in range(end - start):
      column = start + i
      if group and column % group == 0:
        scales[:, column // group] = np.abs(w_block[:, i:i + group]).max(1) / largest
      scale = scales[:, column // group if group else 0]
      rounded = np.clip(np.round(w_block[:, i] / np.where(scale == 0, 1.0, scale)),
                        -largest, largest)
      values[:, column] = rounded
      error = (w_block[:, i] - rounded * scale) / u_block[i, i]
      w_block[:, i:] -= np.outer(error, u_block[i, i:])
      errors[:, i] = error
    w[:, end:] -= errors @ u[start:end, end:]
  return _stored(values, scales, shape, name, dtype, group)


def awq_scale(x: np.ndarray, weights: list[np.ndarray], dtype: str, group: int,
              kv_groups: int = 1, head_dim: int = 0, grid: int = AWQ_GRID) -> np.ndarray:
  """(s, a): AWQ's input scale s [inputs] and its exponent a, for the projections `weights` ([outputs, inputs]
  matrices, `matrix`) that all read `x` [N, inputs]: the s = mean|x|^a (normalized)
  whose rounded weights W * s reproduce x @ W^T best from x / s, a in 0, 1/grid, ...

  kv_groups > 1 (wo of grouped-query attention): inputs are [H, D] flattened (D =
  head_dim, head h of kv head h // kv_groups) and s is shared by the query heads of a kv
  head, as the value projection that s is folded into has one output per kv head."""
  magnitude = np.abs(x).astype(np.float64).mean(0)
  if kv_groups > 1:
    shared = magnitude.reshape(-1, kv_groups, head_dim).mean(1, keepdims=True)
    magnitude = np.broadcast_to(shared, (shared.shape[0], kv_groups, head_dim)).reshape(-1)
  x = x.astype(np.float64)
  references = [x @ w.T for w in weights]
  best = (np.inf, None, None)
  for step in range(grid):
    s = np.maximum(magnitude ** (step / grid), 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    error = sum(np.sum(((x / s) @ round_to_nearest(w * s, dtype, group).T - reference) ** 2)
                for w, reference in zip(weights, references))
    if error < best[0]:
      best = (error, s, step / grid)
  return best[1], best[2]


def _scale_inputs(param: nnx.Param, name: str, s: np.ndarray) -> None:
  """param (a weight named `name`) *= s along its input channels (flattened in order)."""
  in_axes = quantize_lib.IN_AXES[name]
  shape = param[...].shape
  first, last = in_axes[0], in_axes[-1]
  s = s.reshape((1,) * first + shape[first:last + 1] + (1,) * (len(shape) - last - 1))
  param[...] = (np.asarray(param[...], np.float64) * s).astype(param[...].dtype)


def _divide(param: nnx.Param, s: np.ndarray) -> None:
  """param /= s, s broadcast against param's trailing axes."""
  param[...] = (np.asarray(param[...], np.float64) / s).astype(param[...].dtype)


def apply_awq(model, inputs: dict, dtype: str, group: int) -> dict:
  """AWQ's scales (`awq_scale`) searched on the recorded `inputs` (projection_inputs)
  and folded into `model` (a float Transformer) in place: its outputs do not change.
  Returns {"layer.projection": a} of the exponents chosen."""
  config = model.config
  kv_groups = config.n_heads // config.n_kv_heads
  chosen = {}

  def search(key, x, modules_names, **tie):
    weights = [matrix(np.asarray(getattr(module, name)[...], np.float64), name)
               for module, name in modules_names]
    s, chosen[key] = awq_scale(x, weights, dtype, group, **tie)
    for module, name in modules_names:
      _scale_inputs(getattr(module, name), name, s)
    return s

  for layer, block in enumerate(model.blocks):
    attn, mlp = block.attn, block.mlp
    s = search(f"{layer}.qkv", inputs["attn"][layer], [(attn, "wq"), (attn, "wk"), (attn, "wv")])
    _divide(block.attn_norm.scale, s)
    s = search(f"{layer}.wo", inputs["wo"][layer], [(attn, "wo")], kv_groups=kv_groups,
               head_dim=config.head_dim)
    per_kv_head = s.reshape(config.n_kv_heads, kv_groups, config.head_dim)[:, 0]  # [K, D]
    _divide(attn.wv, per_kv_head)
    if config.qkv_bias:
      _divide(attn.bv, per_kv_head)
    s = search(f"{layer}.gate_up", inputs["mlp"][layer], [(mlp, "w_gate"), (mlp, "w_up")])
    _divide(block.mlp_norm.scale, s)
    s = search(f"{layer}.down", inputs["w_down"][layer], [(mlp, "w_down")])
    _divide(mlp.w_up, s)
  if not config.tie_embeddings:
    s = search("head", inputs["lm_head"][0], [(model, "lm_head")])
    _divide(model.final_norm.scale, s)
  return chosen


def quantize(model, config, tokens, method: str):
  """(a Transformer of `config` with quantized weights, report dict) from `model` (the
  same model with float weights; changed in place by AWQ's folding): config.quantize /
  quantize_group say the format, `method` (METHODS) the rounding, `tokens` [B, L] the
  calibration inputs (unused by rtn)."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}; use one of {', '.join(METHODS)}")
  group = quantize_lib.group_of(config)
  report = {"method": method, "calibration_tokens": int(np.size(tokens)) if method != "rtn"
            else 0}
  rounding = None
  if method != "rtn":
    inputs = projection_inputs(model, tokens)
  if method == "awq":
    report["awq_exponents"] = apply_awq(model, inputs, config.quantize, group)
  elif method == "gptq":
    hessians = {}

    def rounding(layer, module, name, weight):
      if name == "embed":  # a lookup (and a tied head): to nearest
        return quantize_lib.quantize_weight(weight, name, config.quantize, group)
      key = (INPUT_OF[name], layer or 0)
      if key not in hessians:
        x = inputs[key[0]][key[1]].astype(np.float64)
        hessians[key] = x.T @ x / len(x)
      return gptq(weight, name, hessians[key], config.quantize, group)

  transformer.quantize_weights(model, config, rounding)
  graphdef, targets = transformer.abstract_params(config, model.mesh)
  params = jax.tree.map(
      lambda value, target: jax.device_put(jnp.asarray(value).astype(target.dtype),
                                           target.sharding),
      nnx.to_pure_dict(nnx.state(model)), targets)
  return nnx.merge(graphdef, params), report
