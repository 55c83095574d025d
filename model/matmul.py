"""Mixed-precision projections: activations times weights with float32 accumulation.

  y = project("blm,mf->blf", x, w_gate)        # x [B, L, M] bf16, w [M, F] fp32 master

The weight is cast to the activations' dtype (the compute dtype), the product is
accumulated in float32 and returned in `out_dtype` (default: the activations' dtype).
The backward pass is written out (custom VJP) so that its two matmuls are of the same
kind: the output gradient is cast to the compute dtype, both products accumulate in
float32, and the weight gradient comes back in float32 without a bfloat16 rounding.
Left to autodiff, a float32 output gradient against a bfloat16 operand makes XLA
compute those matmuls in float32, and bf16 x bf16 -> bf16 is slower still. On this
repository's CPU (AMX), XLA runs the tiny model's [16384, 768] x [768, 256] at 1546
GFLOP/s as bf16 x bf16 -> f32, 296 in float32 and 148 as bf16 -> bf16. On TPU and GPU
the matrix units accumulate in float32 anyway.

With float32 compute everything is float32 and the products are the usual ones.
"""

import functools

import jax
import jax.numpy as jnp

from model import quantize


def project(spec: str, x, weight, out_dtype=None):
  """einsum(spec, x, weight) in x.dtype with float32 accumulation, as `out_dtype`
  (`_project`); a quantized weight (model/quantize.QuantizedWeight) goes to
  quantize.project. Row dims of x of size 1 are left out of the product
  (`_without_unit_rows`)."""
  spec, x, restore = _without_unit_rows(spec, x)
  if isinstance(weight, quantize.QuantizedWeight):
    return restore(quantize.project(spec, x, weight, out_dtype))
  return restore(_project(spec, x, weight, out_dtype))


def _without_unit_rows(spec: str, x):
  """(spec, x, restore): the einsum without x's row dims (in x and the output, not in
  the weight) of size 1, one row dim kept; restore(y) puts them back in the
  output. XLA:CPU copies a [V, M] weight to [M, V] on every call for a product with
  x [B, 1, M] (a decode step) or [1, L, M] (a prompt chunk), not for [B, M] or [L, M]:
  measured on the 58M model's decode, the head's copy alone was 25 ms of each 4-step
  call. Dropping a dim of size 1 changes no sharding."""
  x_letters, w_letters, out_letters = quantize.einsum_letters(spec)
  rows = [i for i, letter in enumerate(x_letters)
          if letter not in w_letters and letter in out_letters]
  unit = [i for i in rows if x.shape[i] == 1]
  if len(unit) == len(rows):
    unit = unit[:-1]  # a matrix product, not a vector's
  if not unit:
    return spec, x, lambda y: y
  dropped = [x_letters[i] for i in unit]
  keep = lambda letters: "".join(letter for letter in letters if letter not in dropped)
  axes = tuple(out_letters.index(letter) for letter in dropped)
  return (f"{keep(x_letters)},{w_letters}->{keep(out_letters)}", jnp.squeeze(x, unit),
          lambda y: jnp.expand_dims(y, axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _project(spec: str, x, weight, out_dtype=None):
  """einsum(spec, x, weight) in x.dtype with float32 accumulation, as `out_dtype`.

  spec: a two-operand einsum in which every summed index appears in both operands and
  every output index in exactly one of them with the batch-like ones in x (true of
  every projection: "blm,mhd->blhd", "blhd,hdm->blm", "blm,vm->blv", ...; letters of
  core/__init__.py).
  x: activations in the compute dtype; weight: parameters (any float dtype).
  Sharding: whatever the operands carry (jit/GSPMD propagates it).
  """
  product = jnp.einsum(spec, x, weight.astype(x.dtype), preferred_element_type=jnp.float32)
  return product.astype(out_dtype or x.dtype)


def _project_fwd(spec, x, weight, out_dtype):
  return _project(spec, x, weight, out_dtype), (x, weight)


def _project_bwd(spec, out_dtype, residuals, grad):
  x, weight = residuals
  x_spec, w_spec, out_spec = quantize.einsum_letters(spec)
  grad = grad.astype(x.dtype)
  grad_x = jnp.einsum(f"{out_spec},{w_spec}->{x_spec}", grad, weight.astype(x.dtype),
                      preferred_element_type=jnp.float32)
  grad_w = jnp.einsum(f"{x_spec},{out_spec}->{w_spec}", x, grad,
                      preferred_element_type=jnp.float32)
  return grad_x.astype(x.dtype), grad_w.astype(weight.dtype)


_project.defvjp(_project_fwd, _project_bwd)
