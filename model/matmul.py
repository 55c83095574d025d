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
  quantize.project."""
  if isinstance(weight, quantize.QuantizedWeight):
    return quantize.project(spec, x, weight, out_dtype)
  return _project(spec, x, weight, out_dtype)


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
