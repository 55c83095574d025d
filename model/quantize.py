"""int8 weights for serving: round-to-nearest with one float32 scale per output channel.

  model.quantize = "int8"   (serve.py: --config.serve.quantize=int8)

Every projection weight (wq, wk, wv, wo, w_gate, w_up, w_down, lm_head) and the
embedding table is stored as int8 values of the weight's own shape and sharding, next to
a float32 `<name>_scale` parameter: the weight without its input axes (one scale per
output channel; per vocabulary row for the embedding and the head), so that

  weight ~= values * scale       (broadcast over the input axes, IN_AXES)

and a projection is an integer product scaled once at the end:

  y = einsum(x, values) * scale            weight-only (TPU, GPU): x in the compute
                                           dtype, the int8 -> bf16 conversion fused into
                                           the matmul by XLA
  y = einsum(x8, values) * x_scale * scale dynamic activations (CPU): x rounded to int8
                                           per token as well (as torch's dynamic
                                           quantization does), int8 x int8 -> int32

XLA:CPU does not fuse the conversion into a dot: it writes the whole converted weight
first. Measured here (32 rows x 512 x 32000, the head of bench/decode.py's model):
bf16 x bf16 1.7 ms, int8 converted to bf16 6.4 ms, int8 x int8 -> int32 0.8 ms. Hence
the CPU path rounds the activations too; `Int8Weight.activations` says which.

Serving only: nothing here has a gradient. model/transformer.py's `_quantize_weights`
turns a float model's parameters into these (at creation, or as a float checkpoint
loads); a checkpoint saved from them (tools/quantize.py) loads directly.

Why not qwix (Google's JAX quantization library, 0.1.8 on the package registry): its
post-training quantization finds a layer's weight by tracing the dot's operand back to
a parameter, and where that fails by shape. ringlm's projections reach the dot through
a custom-VJP sharding gather, so it fell back to shapes: wk/wv and w_gate/w_up share
theirs, and it left them (and lm_head, shaped like the embedding) in float32 without a
word, then failed in the model's own code on its wrapped arrays (tried 2026-12-06).
"""

import dataclasses

import jax
import jax.numpy as jnp

from parallel import int8

# The input (contracted) axes of each quantized weight; its other axes are outputs.
IN_AXES = {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1), "w_gate": (0,), "w_up": (0,),
           "w_down": (0,), "lm_head": (1,), "embed": (1,)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight:
  """A weight as a projection reads it: int8 values and their per-channel scales."""
  values: jax.Array     # int8, the weight's shape
  scale: jax.Array      # float32, the weight's shape without in_axes
  in_axes: tuple = dataclasses.field(metadata=dict(static=True))
  # Round the activations to int8 per token too (CPU), or widen the values (TPU, GPU).
  activations: bool = dataclasses.field(default=False, metadata=dict(static=True))


def scale_axes(logical_axes: tuple, in_axes: tuple) -> tuple:
  """The logical axes of a weight's scale: its own without the input axes."""
  return tuple(axis for i, axis in enumerate(logical_axes) if i not in in_axes)


def quantize_weight(weight, name: str):
  """(int8 values, float32 scale) of a float weight named `name` (a key of IN_AXES)."""
  return int8.quantize(weight, IN_AXES[name])


def dequantize(weight: Int8Weight, dtype=jnp.float32):
  scale = jnp.expand_dims(weight.scale, weight.in_axes)
  return (weight.values.astype(jnp.float32) * scale).astype(dtype)


def einsum_letters(spec: str) -> tuple[str, str, str]:
  """("blm", "mf", "blf") of a two-operand einsum spec "blm,mf->blf"."""
  inputs, out = spec.replace(" ", "").split("->")
  x, w = inputs.split(",")
  return x, w, out


def project(spec: str, x, weight: Int8Weight, out_dtype=None):
  """einsum(spec, x, weight) for an int8 weight (model/matmul.project's contract): float32
  sums, scaled, returned in `out_dtype` (default x.dtype). Shapes and shardings as the
  float projection."""
  x, weight, spec = _merge_contracted(spec, x, weight)
  x_letters, w_letters, out_letters = einsum_letters(spec)
  contracted = [letter for letter in x_letters if letter in w_letters]
  w_rest = "".join(letter for letter in w_letters if letter not in contracted)
  scale = _broadcast_to(weight.scale, w_rest, out_letters)
  if weight.activations:
    axes = tuple(x_letters.index(letter) for letter in contracted)
    x8, x_scale = int8.quantize(x, axes)
    product = jnp.einsum(spec, x8, weight.values, preferred_element_type=jnp.int32)
    x_rest = "".join(letter for letter in x_letters if letter not in contracted)
    scale = scale * _broadcast_to(x_scale, x_rest, out_letters)
  else:
    product = jnp.einsum(spec, x, weight.values.astype(x.dtype),
                         preferred_element_type=jnp.float32)
  return (product.astype(jnp.float32) * scale).astype(out_dtype or x.dtype)


def _merge_contracted(spec: str, x, weight: Int8Weight):
  """(x, weight, spec) with the contracted dimensions merged into one when they are
  adjacent and in the same order in both operands ("blhd,hdm->blm" -> "blc,cm->blm"),
  as the float projection's dot sees them (unmerged, XLA:CPU's compiled decode
  transposed and copied wo's int8 values on every call)."""
  x_letters, w_letters, out_letters = einsum_letters(spec)
  contracted = "".join(letter for letter in x_letters if letter in w_letters)
  if len(contracted) < 2 or contracted not in x_letters or contracted not in w_letters:
    return x, weight, spec
  merged = next(letter for letter in "cjnpqrstuz" if letter not in spec)
  def merge(array, letters):
    start = letters.index(contracted)
    shape = array.shape[:start] + (-1,) + array.shape[start + len(contracted):]
    return array.reshape(shape), letters.replace(contracted, merged)
  x, x_letters = merge(x, x_letters)
  values, w_letters = merge(weight.values, w_letters)
  start = weight.in_axes[0]
  weight = dataclasses.replace(weight, values=values, in_axes=(start,))
  return x, weight, f"{x_letters},{w_letters}->{out_letters}"


def _broadcast_to(array, letters: str, out_letters: str):
  """`array` (dimensions `letters`, each in out_letters) laid out for broadcasting
  against an array of dimensions `out_letters`."""
  order = sorted(letters, key=out_letters.index)
  array = jnp.transpose(array, [letters.index(letter) for letter in order])
  shape = [array.shape[order.index(letter)] if letter in order else 1 for letter in out_letters]
  return array.reshape(shape)


def embed(table: Int8Weight, tokens, dtype):
  """The rows of a quantized embedding table [V, M] for `tokens` [B, L]: [B, L, M]."""
  rows = jnp.take(table.values, tokens, axis=0).astype(jnp.float32)
  return (rows * jnp.take(table.scale, tokens, axis=0)[..., None]).astype(dtype)
