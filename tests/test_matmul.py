"""model.matmul.project: values and both gradients against float64 NumPy."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.matmul import project

# (spec, x shape, weight shape): every projection the transformer makes
# (letters of core/__init__.py)
CASES = [("blm,mhd->blhd", (2, 6, 16), (16, 4, 8)),   # q
         ("blm,mkd->blkd", (2, 6, 16), (16, 2, 8)),   # k, v
         ("blhd,hdm->blm", (2, 6, 4, 8), (4, 8, 16)),   # attention output
         ("blm,mf->blf", (2, 6, 16), (16, 24)),         # gate, up
         ("blf,fm->blm", (2, 6, 24), (24, 16)),         # down
         ("blm,vm->blv", (2, 6, 16), (40, 16)),         # head ([V, M])
         ("blm,vm->blv", (3, 1, 16), (40, 16)),         # a decode step's head
         ("blm,nm->bln", (1, 6, 16), (24, 16)),         # a prompt chunk's q (as matrix)
         ("blhd,hdm->blm", (1, 1, 4, 8), (4, 8, 16))]   # one row, one token


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("spec, x_shape, w_shape", CASES)
def test_project_and_its_gradients_match_float64(spec, x_shape, w_shape, dtype, tolerance):
  rng = np.random.default_rng(zlib.crc32(spec.encode()))  # (str hash varies by process)
  x, weight = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
  out_shape = np.einsum(spec, x, weight).shape
  cotangent = rng.standard_normal(out_shape)

  def loss(x, weight):
    y = project(spec, x.astype(dtype), weight, jnp.float32)
    return (y * cotangent.astype(np.float32)).sum()

  x32, w32 = jnp.asarray(x, jnp.float32), jnp.asarray(weight, jnp.float32)
  value = project(spec, x32.astype(dtype), w32)
  grad_x, grad_w = jax.grad(loss, (0, 1))(x32, w32)
  assert value.dtype == dtype and grad_w.dtype == jnp.float32

  # float64 references: y = x.w; dL/dx = g.w; dL/dw = x.g (einsum transposes)
  inputs, out = spec.split("->")
  x_spec, w_spec = inputs.split(",")
  expected = {"value": np.einsum(spec, x, weight),
              "grad_x": np.einsum(f"{out},{w_spec}->{x_spec}", cotangent, weight),
              "grad_w": np.einsum(f"{x_spec},{out}->{w_spec}", x, cotangent)}
  for name, got in (("value", value), ("grad_x", grad_x), ("grad_w", grad_w)):
    want = expected[name]
    error = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
    assert error <= tolerance, (name, error)


def test_a_decode_step_reads_the_head_where_it_lies():
  """A decode loop's product of x [B, 1, M] and the head [V, M] on XLA:CPU: the compiled
  program holds no copy of the weight as [M, V]. With the dim of size 1 in the product
  XLA:CPU copied the weight on every call (project leaves such dims out)."""
  def decode_loop(product):
    def run(x, weight):
      def step(i, x):
        return x + product(x, weight)[..., :x.shape[-1]].astype(x.dtype)
      return jax.lax.fori_loop(0, 2, step, x)
    shapes = (jax.ShapeDtypeStruct((8, 1, 64), jnp.bfloat16),
              jax.ShapeDtypeStruct((1000, 64), jnp.bfloat16))
    return jax.jit(run).lower(*shapes).compile().as_text()
  copied = "bf16[64,1000]{1,0} fusion"
  assert copied not in decode_loop(lambda x, w: project("blm,vm->blv", x, w, jnp.float32))
  # the check can tell: the einsum as it was written
  assert copied in decode_loop(lambda x, w: jnp.einsum("blm,vm->blv", x, w,
                                                       preferred_element_type=jnp.float32))
