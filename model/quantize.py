"""Quantized weights for serving: int8 with one float32 scale per output channel, or int4
with one per group of input channels.

  model.quantize = "int8"   (serve.py: --config.serve.quantize=int8)
  model.quantize = "int4"   (groups of model.quantize_group input channels, 128 by default)

Every projection weight (wq, wk, wv, wo, w_gate, w_up, w_down, lm_head) and the
embedding table is stored as values of the weight's own shape and sharding (int8 or
int4), next to a float32 `<name>_scale` parameter:
  - int8: the weight without its input axes (IN_AXES): one scale per output channel,
    per vocabulary row for the embedding and the head;
  - int4: the input axes replaced by one axis of (their size / group) at the first's
    place: wq [M, H, D] -> [M/g, H, D], wo [H, D, M] -> [H*D/g, M], lm_head [V, M] ->
    [V, M/g] (`scale_shape`),
so that weight ~= values * scale (broadcast over the channels a scale covers), and a
projection is an integer product scaled once at the end (per group for int4):

  y = einsum(x, values) * scale            weight-only (TPU, GPU): x in the compute
                                           dtype, the int -> bf16 conversion fused into
                                           the matmul by XLA
  y = einsum(x8, values) * x_scale * scale dynamic activations (CPU): x rounded to int8
                                           per token as well (as torch's dynamic
                                           quantization does), int8 x int8 -> int32

XLA:CPU does not fuse the conversion into a dot: it writes the whole converted weight
first. Measured here (32 rows x 512 x 32000, the head of bench/decode.py's model):
bf16 x bf16 1.7 ms, int8 converted to bf16 6.4 ms, int8 x int8 -> int32 0.8 ms. Hence
the CPU path rounds the activations too; `QuantizedWeight.activations` says which.

The rounding is to nearest here (`quantize_weight`); model/calibration.py finds values
that reproduce the float layer better on real inputs (GPTQ, AWQ) and stores them in the
same form. Serving only: nothing here has a gradient. model/transformer.py's
`quantize_weights` turns a float model's parameters into these (at creation, or as a
float checkpoint loads); a checkpoint saved from them (tools/quantize.py) loads directly.

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

from parallel import quantized

# The input (contracted) axes of each quantized weight; its other axes are outputs.
IN_AXES = {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1), "w_gate": (0,), "w_up": (0,),
           "w_down": (0,), "lm_head": (1,), "embed": (1,)}


DTYPES = {"int8": jnp.int8, "int4": jnp.int4}  # model.quantize -> the values' dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight:
  """A weight as a projection reads it: int8 or int4 values and their scales."""
  values: jax.Array     # int8 / int4, the weight's shape
  scale: jax.Array      # float32, `scale_shape` of the weight
  in_axes: tuple = dataclasses.field(metadata=dict(static=True))
  # 0: one scale per output channel; g: one per g input channels (the in_axes flattened).
  group: int = dataclasses.field(default=0, metadata=dict(static=True))
  # Round the activations to int8 per token too (CPU), or widen the values (TPU, GPU).
  activations: bool = dataclasses.field(default=False, metadata=dict(static=True))


def held_dtype(quantize: str, platform: str | None):
  """The dtype a model of model.quantize=`quantize` holds its values in on `platform`:
  int8 / int4, except int4 on CPU, held in int8 (the same values; checkpoints still
  store int4). XLA:CPU in jax 0.10.2 cannot pass a sharded int4 array to a program
  compiled ahead of time: the array's layout says sub_byte_element_size_in_bits=0, the
  program's 4, and the call is refused. TPU and GPU hold int4, two to a byte."""
  if quantize == "int4" and platform == "cpu":
    return jnp.int8
  return DTYPES[quantize]


def group_of(config) -> int:
  """The input channels one scale covers in a model of `config` (0: all of them)."""
  return config.quantize_group if config.quantize == "int4" else 0


def scale_axes(logical_axes: tuple, in_axes: tuple, group: int = 0) -> tuple:
  """The logical axes of a weight's scale: its own without the input axes, or with
  groups the input axes replaced by one named as the first."""
  first, last = in_axes[0], in_axes[-1]
  kept = (logical_axes[first],) if group else ()
  return logical_axes[:first] + kept + logical_axes[last + 1:]


def _grouped_shape(shape: tuple, in_axes: tuple, group: int) -> tuple:
  """`shape` with its input axes flattened and split into (groups, group)."""
  first, last = in_axes[0], in_axes[-1]
  size = 1
  for axis in in_axes:
    size *= shape[axis]
  return shape[:first] + (size // group, group) + shape[last + 1:]


def quantize_weight(weight, name: str, dtype: str = "int8", group: int = 0):
  """(values, float32 scale) of a float weight named `name` (a key of IN_AXES), rounded
  to nearest: int8 / int4 (`dtype`), one scale per output channel (group 0) or per
  `group` input channels."""
  in_axes = IN_AXES[name]
  if not group:
    return quantized.quantize(weight, in_axes, DTYPES[dtype])
  grouped = weight.reshape(_grouped_shape(weight.shape, in_axes, group))
  values, scale = quantized.quantize(grouped, in_axes[0] + 1, DTYPES[dtype])
  return values.reshape(weight.shape), scale


def dequantize(weight: QuantizedWeight, dtype=jnp.float32):
  """values * scale computed in `dtype`: the float weight a quantized one stands for
  (in bf16 the scale is rounded to bf16 first, so that no float32 copy of the weight
  is made; the values are exact in it)."""
  values = weight.values.astype(dtype)
  if not weight.group:
    return values * jnp.expand_dims(weight.scale, weight.in_axes).astype(dtype)
  grouped = values.reshape(_grouped_shape(values.shape, weight.in_axes, weight.group))
  scale = jnp.expand_dims(weight.scale, weight.in_axes[0] + 1).astype(dtype)
  return (grouped * scale).reshape(values.shape)


def einsum_letters(spec: str) -> tuple[str, str, str]:
  """("blm", "mf", "blf") of a two-operand einsum spec "blm,mf->blf"."""
  inputs, out = spec.replace(" ", "").split("->")
  x, w = inputs.split(",")
  return x, w, out


# A grouped (int4) weight's int8 x int8 product on CPU runs one plain product per group
# (contiguous slices of x and of the values, each scaled and summed): up to this many
# rows (decode). Beyond (prefill), the weight is dequantized to x.dtype instead.
GROUPED_PRODUCT_ROWS = 256


def project(spec: str, x, weight: QuantizedWeight, out_dtype=None):
  """einsum(spec, x, weight) for a quantized weight (model/matmul.project's contract):
  float32 sums, scaled, returned in `out_dtype` (default x.dtype). Shapes and shardings
  as the float projection.

  int4 (grouped) weights: weight-only (TPU, GPU) and for more than GROUPED_PRODUCT_ROWS
  rows the weight is dequantized to x.dtype for one product; else (CPU decode) x is
  rounded to int8 per token and each group's int8 x int8 product is scaled and summed
  (measured on the 58M model, 32 rows: [512] x [1536] 0.33 ms, the head [512] x [32000]
  4.0 ms, against 0.17 / 1.7 ms for int8; one batched product over the groups took 4.6
  and 32 ms, XLA:CPU transposing its operands)."""
  x, weight, spec = _merge_contracted(spec, x, weight)
  x_letters, w_letters, out_letters = einsum_letters(spec)
  contracted = [letter for letter in x_letters if letter in w_letters]
  if weight.group and (not weight.activations or x.size // weight.values.shape[
      weight.in_axes[0]] > GROUPED_PRODUCT_ROWS):
    # (XLA fuses the widening into the matmul's operand on TPU and GPU; on CPU one
    # layer's weight at a time is written in x.dtype.)
    product = jnp.einsum(spec, x, dequantize(weight, x.dtype), preferred_element_type=jnp.float32)
    return product.astype(out_dtype or x.dtype)
  w_rest = "".join(letter for letter in w_letters if letter not in contracted)
  x_rest = "".join(letter for letter in x_letters if letter not in contracted)
  values = weight.values
  if not weight.activations:
    product = jnp.einsum(spec, x, values.astype(x.dtype), preferred_element_type=jnp.float32)
    out = product * _broadcast_to(weight.scale, w_rest, out_letters)
    return out.astype(out_dtype or x.dtype)
  x8, x_scale = quantized.quantize(x, tuple(x_letters.index(letter) for letter in contracted))
  x_scale = _broadcast_to(x_scale, x_rest, out_letters)
  values = values.astype(jnp.int8)
  if not weight.group:
    product = jnp.einsum(spec, x8, values, preferred_element_type=jnp.int32)
    out = product.astype(jnp.float32) * _broadcast_to(weight.scale, w_rest, out_letters)
    return (out * x_scale).astype(out_dtype or x.dtype)
  (letter,) = contracted  # merged: one contracted axis, cut into groups
  x_axis, w_axis, group = x_letters.index(letter), w_letters.index(letter), weight.group
  out = 0.0
  for index in range(values.shape[w_axis] // group):
    part = lambda array, axis: jax.lax.slice_in_dim(array, index * group, (index + 1) * group,
                                                    axis=axis)
    product = jnp.einsum(spec, part(x8, x_axis), part(values, w_axis),
                         preferred_element_type=jnp.int32)
    scale = jnp.take(weight.scale, index, axis=w_axis)  # the group's, letters w_rest
    out = out + product.astype(jnp.float32) * _broadcast_to(scale, w_rest, out_letters)
  return (out * x_scale).astype(out_dtype or x.dtype)


def _merge_contracted(spec: str, x, weight: QuantizedWeight):
  """(x, weight, spec) with the contracted dimensions merged into one when they are
  adjacent and in the same order in both operands ("blhd,hdm->blm" -> "blc,cm->blm"),
  as the float projection's dot sees them (unmerged, XLA:CPU's compiled decode
  transposed and copied wo's int8 values on every call). The scale needs no change:
  a grouped one already has the input axes as one."""
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


def embed(table: QuantizedWeight, tokens, dtype):
  """The rows of a quantized embedding table [V, M] for `tokens` [B, L]: [B, L, M]."""
  rows = jnp.take(table.values, tokens, axis=0).astype(jnp.float32)  # [B, L, M]
  scale = jnp.take(table.scale, tokens, axis=0)                        # [B, L] or [B, L, M/g]
  if not table.group:
    return (rows * scale[..., None]).astype(dtype)
  grouped = rows.reshape(rows.shape[:-1] + (-1, table.group)) * scale[..., None]
  return grouped.reshape(rows.shape).astype(dtype)
