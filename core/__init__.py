"""Leaf definitions that every ringlm package may import (this package imports none of them).

`core.errors.ConfigError` is the one error type of a configuration that cannot work.

Dimension letters
-----------------
One vocabulary for every shape comment, docstring and einsum in ringlm (einsums use
the lower-case letters):

  B  batch rows                          M  model dimension (embedding width)
  L  tokens of a row (queries)           F  SwiGLU hidden units
  S  key/value tokens (a key block,      V  vocabulary
     the cache) when they differ from L  C  cache slots
  H  query heads                         N  devices on the ring (mesh.sequence)
  K  key/value heads (GQA)               R  folded query rows, G x a query block
  G  query heads per kv head, H // K        (parallel/kernels/xla.py)
  D  head dimension

Block sizes are `block_q` / `block_kv` (bq, bk in grids and BlockSpecs) and block
counts nq, nk. Examples: the query projection is "blm,mhd->blhd", the output head
"blm,vm->blv", a kernel's logits "blhd,bshd->bhls"; a KV cache layer holds keys
[B, K, D, C] and values [B, K, C, D].
"""
