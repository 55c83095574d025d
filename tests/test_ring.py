"""ring_attention on multi-device meshes against the float64 reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel import layout, ring
from parallel.kernels import reference
from parallel.mesh import make_mesh
from parallel.ring import ring_attention
from tests.inputs import attention_inputs


def _relative_error(actual, expected):
  return np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("order", ["natural", "zigzag"])
def test_ring_attention_matches_reference(mesh, order, rng):
  q, k, v, positions, _, segments, _, dout = attention_inputs(
      rng, batch=2, q_len=64, q_heads=4, kv_heads=2, head_dim=16, doc_len=40)
  if order == "zigzag":
    q, k, v, positions, segments, dout = (
        layout.to_zigzag(x, mesh.shape["sequence"]) for x in (q, k, v, positions, segments, dout))

  @jax.jit
  def attend(q, k, v):
    return ring_attention(q, k, v, positions=positions, segment_ids=segments, mesh=mesh,
                          block_q=8, block_kv=8)

  loss_grads = jax.jit(jax.grad(lambda q, k, v: (attend(q, k, v) * dout).sum(), argnums=(0, 1, 2)))
  out = attend(q, k, v)
  grads = loss_grads(q, k, v)

  ref_out, _ = reference.attention(q, k, v, positions, positions, segments, segments)
  ref_grads = reference.attention_grads(q, k, v, positions, positions, segments, segments, dout)
  assert _relative_error(out, ref_out) < 1e-5
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert _relative_error(grad, ref_grad) < 1e-5, name
  expected = jax.NamedSharding(mesh, jax.P(("data", "fsdp"), "sequence", "tensor", None))
  assert out.sharding.is_equivalent_to(expected, out.ndim)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_ring_attention_with_pallas_kernels(impl, rng):
  """The Pallas kernels (interpret mode on CPU) inside the ring, zigzag order, fwd and grads."""
  mesh = make_mesh({"data": 2, "sequence": 4})
  q, k, v, positions, _, segments, _, dout = (
      layout.to_zigzag(x, 4)
      for x in attention_inputs(rng, batch=2, q_len=64, q_heads=4, kv_heads=1, doc_len=40))

  def attend(q, k, v):
    return ring_attention(q, k, v, positions=positions, segment_ids=segments, mesh=mesh,
                          impl=impl, block_q=8, block_kv=8)

  out, grad_fn = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v))(q, k, v)
  grads = jax.jit(grad_fn)(dout)
  ref_out, _ = reference.attention(q, k, v, positions, positions, segments, segments)
  ref_grads = reference.attention_grads(q, k, v, positions, positions, segments, segments, dout)
  assert _relative_error(out, ref_out) < 1e-5
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert _relative_error(grad, ref_grad) < 1e-5, name


def test_ring_attention_non_causal(rng):
  mesh = make_mesh({"sequence": 4, "tensor": 2})
  q, k, v, positions, _, segments, _, _ = attention_inputs(rng, batch=1, q_len=64, q_heads=8,
                                                            kv_heads=2)
  out = jax.jit(lambda q, k, v: ring_attention(q, k, v, positions=positions, causal=False,
                                               mesh=mesh, block_q=8, block_kv=8))(q, k, v)
  ref_out, _ = reference.attention(q, k, v, positions, positions, segments, segments, causal=False)
  assert _relative_error(out, ref_out) < 1e-5


def test_unknown_impl_is_a_clear_error(single_device_mesh, rng):
  q, k, v, positions, *_ = attention_inputs(rng, batch=1, q_len=16)
  with pytest.raises(ValueError, match="attention.impl='triton' is not available"):
    ring_attention(q, k, v, positions=positions, mesh=single_device_mesh, impl="triton")


@pytest.mark.parametrize("impl", ["auto", "xla"])  # auto: the C++ kernel (cpu_decode)
@pytest.mark.parametrize("ring_size", [1, 8])
@pytest.mark.parametrize("live_rows", [0, 1])
def test_cache_attention_reads_only_the_live_slots(ring_size, live_rows, impl, rng):
  """ring.cache_attention over a slot cache laid out as ring.slot_write lays it (global
  slot g on device g % N, local index g // N) against float64 NumPy over the first
  `live` global slots; the slots beyond hold visible garbage that must not be read.
  With `live_rows`, the rows beyond it get zeros."""
  from parallel.ring import cache_attention
  devices = jax.devices()[:ring_size]
  mesh = make_mesh({"sequence": ring_size}, devices=devices)
  batch, length, heads, kv_heads, dim, capacity, live = 2, 3, 4, 2, 8, 64, 32
  q = rng.standard_normal((batch, length, heads, dim)).astype(np.float32)
  k_global = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
  v_global = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
  positions_global = np.tile(np.arange(capacity, dtype=np.int32), (batch, 1))
  q_positions = np.array([[20, 25, 31], [5, 9, 28]], np.int32)
  # array column d * (C / N) + l holds global slot l * N + d
  local = capacity // ring_size
  columns = np.arange(capacity)
  order = (columns % local) * ring_size + columns // local
  k = np.transpose(k_global[:, :, order], (0, 1, 3, 2))  # [B, K, D, C]
  v, positions = v_global[:, :, order], positions_global[:, order]
  positions = np.where(order >= live, 0, positions)  # beyond live: visible garbage
  out = cache_attention(q, k, v, positions, q_positions, mesh=mesh, live=live,
                        live_rows=live_rows, impl=impl)

  qg = q.astype(np.float64).reshape(batch, length, kv_heads, heads // kv_heads, dim)
  kg, vg = k_global[:, :, :live].astype(np.float64), v_global[:, :, :live].astype(np.float64)
  scores = np.einsum("blkgd,bkcd->bkglc", qg, kg) / np.sqrt(dim)
  visible = positions_global[:, None, None, None, :live] <= q_positions[:, None, None, :, None]
  scores = np.where(visible, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum("bkglc,bkcd->blkgd", weights, vg).reshape(batch, length, heads, dim)
  if live_rows:
    expected[live_rows:] = 0
  assert _relative_error(out, expected) < 1e-5
  # without `live`, the garbage is read: the check above can tell the difference
  assert _relative_error(cache_attention(q, k, v, positions, q_positions, mesh=mesh,
                                         impl=impl), expected) > 1e-2


@pytest.mark.parametrize("cache", ["float32", "bfloat16", "bfloat16-bits", "int8"])
@pytest.mark.parametrize("groups,length,window", [(1, 1, 0), (3, 1, 0), (2, 3, 50)])
def test_the_cpu_decode_kernel_matches_float64(cache, groups, length, window, rng):
  """parallel/kernels/cpu_decode.attend alone, against float64 NumPy: head dim 64 and 300
  slots, so both the register tiles (128 slots, 64 dims, 2 query rows) and the slots past
  the last whole tile are used, with 1, 3 (a block of 2 and one of 1) and 6 query rows
  per kv head, a padding query, rows cut by `limit` (one to nothing) and by their last
  visible slot, and a window with sinks. Slots past a row's bound hold NaN: reading one
  would spread it."""
  from parallel import quantized
  from parallel.kernels import cpu_decode
  batch, kv_heads, dim, slots = 4, 2, 64, 300
  limit = np.array([300, 257, 0, 131], np.int32)
  q_pos = np.array([[299, 280, ring.EMPTY], [200, 256, 230], [10, 20, 30],
                    [130, 129, 5]], np.int32)[:, :length]
  if length == 1:
    q_pos = np.array([[299], [256], [10], [99]], np.int32)
  kv_pos = np.tile(np.arange(slots, dtype=np.int32), (batch, 1))
  q = rng.standard_normal((batch, kv_heads, groups, length, dim)).astype(np.float32)
  k = rng.standard_normal((batch, kv_heads, dim, slots)).astype(np.float32)
  v = rng.standard_normal((batch, kv_heads, slots, dim)).astype(np.float32)
  real = q_pos < ring.EMPTY
  bound = [min(limit[b], q_pos[b][real[b]].max(initial=-1) + 1) for b in range(batch)]
  for b in range(batch):  # past each row's bound: NaN
    k[b, :, :, bound[b]:], v[b, :, bound[b]:] = np.nan, np.nan
  scales = dict(k_scale=None, v_scale=None)
  if cache == "int8":
    k, k_scale = quantized.quantize(np.nan_to_num(k), 2)
    v, v_scale = quantized.quantize(np.nan_to_num(v), 3)
    nan_past = np.where(np.arange(slots)[None, None] >= np.array(bound)[:, None, None],
                        np.nan, 1.0)
    scales = dict(k_scale=k_scale * nan_past, v_scale=v_scale * nan_past)
    k_float = np.asarray(k, np.float64) * np.asarray(scales["k_scale"])[:, :, None, :]
    v_float = np.asarray(v, np.float64) * np.asarray(scales["v_scale"])[..., None]
  elif cache.startswith("bfloat16"):
    k, v = (jnp.asarray(x, jnp.bfloat16) for x in (k, v))
    k_float, v_float = (np.asarray(x.astype(jnp.float32), np.float64) for x in (k, v))
    if cache == "bfloat16-bits":
      k, v = (jax.lax.bitcast_convert_type(x, jnp.uint16) for x in (k, v))
  else:
    k_float, v_float = k.astype(np.float64), v.astype(np.float64)
  sinks = 4 if window else 0
  row_max, numerator, denominator = jax.jit(functools.partial(
      cpu_decode.attend, scale=0.125, window=window, sinks=sinks, empty=ring.EMPTY))(
          q, q_pos, k, v, kv_pos, scales["k_scale"], scales["v_scale"], limit)
  out = np.asarray(numerator) / np.where(np.asarray(denominator) == 0, 1, denominator)

  for b in range(batch):
    used = bound[b]
    scores = np.einsum("kgld,kdc->kglc", q[b].astype(np.float64), k_float[b, :, :, :used])
    scores *= 0.125
    seen = kv_pos[b, None, :used] <= q_pos[b, :, None]
    if window:
      seen &= (kv_pos[b, None, :used] > q_pos[b, :, None] - window) | (kv_pos[b, :used] < sinks)
    scores = np.where(seen, scores, -np.inf)
    expected_max = scores.max(-1, initial=-np.inf)
    assert np.array_equal(np.isinf(np.asarray(row_max[b])), np.isinf(expected_max))
    if not used:
      assert not np.asarray(numerator[b]).any() and not np.asarray(denominator[b]).any()
      continue
    weights = np.exp(scores - expected_max[..., None])
    expected = np.einsum("kglc,kcd->kgld", weights, v_float[b, :, :used])
    expected /= weights.sum(-1)[..., None]
    for l in np.nonzero(real[b])[0]:  # the padding query's output is not used
      assert _relative_error(out[b, :, :, l], expected[:, :, l]) < 1e-5, (b, l)
  assert np.isfinite(out).all()


def test_decode_attention_on_cpu_is_the_kernel_and_a_long_chunk_is_not(single_device_mesh):
  """impl="auto" on a CPU mesh: a decode step (and a short chunk) calls the C++ kernel
  (parallel/kernels/cpu_decode.py) and no batched dot; impl="xla" and a chunk of more
  than 64 query rows per kv head stay on XLA's dots. (The values of both paths are
  checked against float64 by the tests around this one.)"""
  from parallel.kernels import cpu_decode
  from parallel.ring import cache_attention
  assert cpu_decode.available(), "g++ is on this machine and CI: the kernel must build"
  batch, heads, kv_heads, dim, capacity = 2, 4, 2, 8, 64
  k = jnp.zeros((batch, kv_heads, dim, capacity), jnp.uint16)
  v = jnp.zeros((batch, kv_heads, capacity, dim), jnp.uint16)
  positions = jnp.zeros((batch, capacity), jnp.int32)

  def program(length, impl):
    q = jnp.zeros((batch, length, heads, dim), jnp.float32)
    q_positions = jnp.zeros((batch, length), jnp.int32)
    return jax.jit(lambda *a: cache_attention(*a, mesh=single_device_mesh, impl=impl)).lower(
        q, k, v, positions, q_positions).as_text()

  kernel = f"custom_call @{cpu_decode.TARGET}"
  for length in (1, 32):  # G * L = 2, 64 rows per kv head
    assert kernel in program(length, "auto") and "dot_general" not in program(length, "auto")
    assert kernel not in program(length, "xla") and "dot_general" in program(length, "xla")
  assert kernel not in program(33, "auto") and "dot_general" in program(33, "auto")


@pytest.mark.parametrize("impl", ["auto", "xla"])
@pytest.mark.parametrize("cache", ["float32", "bfloat16-bits", "int8", "window"])
def test_ragged_rows_read_only_their_own_bucket(cache, impl, single_device_mesh, rng):
  """ring.cache_attention with row_slots: each row attends over the first slots of the
  smallest bucket holding its row_slots (0: zeros), against float64 NumPy over exactly
  those slots; every slot beyond a row's bucket holds visible garbage that must not be
  read. Float32, a bf16 cache held as its bits, an int8 cache (the queries' rounding,
  ~1e-2), and a sliding window with sinks."""
  from parallel import quantized
  from parallel.ring import cache_attention
  batch, heads, kv_heads, dim, capacity = 5, 4, 2, 8, 64
  buckets, row_slots = (8, 16, 64), np.array([3, 0, 9, 16, 40], np.int32)
  attended = np.array([8, 0, 16, 16, 64])  # each row's bucket
  window = dict(window=6, sinks=2) if cache == "window" else {}
  q = rng.standard_normal((batch, 1, heads, dim)).astype(np.float32)
  k = rng.standard_normal((batch, kv_heads, dim, capacity)).astype(np.float32)
  v = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
  slots = np.arange(capacity, dtype=np.int32)
  q_positions = (row_slots - 1).clip(0)[:, None]
  # a row's slots up to its fill hold its tokens; beyond, up to the bucket, nothing
  # (EMPTY); beyond the bucket, garbage that every query would see
  positions = np.where(slots[None] < row_slots[:, None], slots[None], ring.EMPTY)
  positions = np.where(slots[None] >= attended[:, None], 0, positions).astype(np.int32)
  scales = {}
  if cache == "int8":
    k, k_scale = quantized.quantize(k, 2)
    v, v_scale = quantized.quantize(v, 3)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    k_float = np.asarray(k, np.float64) * np.asarray(k_scale)[:, :, None, :]
    v_float = np.asarray(v, np.float64) * np.asarray(v_scale)[..., None]
  elif cache == "bfloat16-bits":
    k, v = (jnp.asarray(x, jnp.bfloat16) for x in (k, v))
    k_float, v_float = (np.asarray(x.astype(jnp.float32), np.float64) for x in (k, v))
    k, v = (jax.lax.bitcast_convert_type(x, jnp.uint16) for x in (k, v))  # BITS_OF
  else:
    k_float, v_float = k.astype(np.float64), v.astype(np.float64)
  attend = lambda **ragged: cache_attention(q, k, v, positions, q_positions,
                                            mesh=single_device_mesh, **scales, **window,
                                            impl=impl, **ragged)
  out = jax.jit(lambda slots: attend(row_slots=slots, row_buckets=buckets))(row_slots)

  expected = np.zeros((batch, 1, heads, dim))
  for b in range(batch):
    if not row_slots[b]:
      continue
    used = attended[b]
    qg = q[b, 0].astype(np.float64).reshape(kv_heads, heads // kv_heads, dim)
    scores = np.einsum("kgd,kdc->kgc", qg, k_float[b, :, :, :used]) / np.sqrt(dim)
    seen = positions[b, :used] <= q_positions[b, 0]
    if window:
      seen &= (positions[b, :used] > q_positions[b, 0] - 6) | (positions[b, :used] < 2)
    scores = np.where(seen, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected[b, 0] = np.einsum("kgc,kcd->kgd", weights, v_float[b, :, :used]).reshape(heads, dim)
  tolerance = {"int8": 1e-2, "bfloat16-bits": 1e-2}.get(cache, 1e-5)
  assert _relative_error(out, expected) < tolerance
  # every row over all the slots reads the garbage: the check above can tell
  assert _relative_error(attend(), expected) > 0.1


@pytest.mark.parametrize("impl", ["auto", "xla"])  # auto: 5 queries go to cpu_decode
@pytest.mark.parametrize("ring_size", [1, 8])
@pytest.mark.parametrize("cache", ["float32", "bfloat16-bits", "int8", "window"])
def test_a_chunk_attends_block_by_block_up_to_its_last_filled_slot(cache, ring_size, impl,
                                                                    rng):
  """A prompt chunk (L > 1 queries) over more than a block of slots per device takes
  ring._blockwise: against float64 NumPy over the filled slots, with slots laid out as
  ring.slot_write lays them and a padding query (position EMPTY). The values of every
  block past the last filled slot are NaN: a block that was read would make NaN of
  every output (a weight of 0 times NaN), so the test fails unless those blocks are
  skipped."""
  from parallel import quantized
  from parallel.ring import EMPTY, cache_attention
  mesh = make_mesh({"sequence": ring_size}, devices=jax.devices()[:ring_size])
  batch, heads, kv_heads, dim, local = 2, 4, 2, 8, 384  # 3 blocks of 128 per device
  capacity, fill = local * ring_size, {1: 200, 8: 700}[ring_size]  # global slots filled
  assert ring._chunk_block(5, local) == 128
  window = dict(window=40, sinks=3) if cache == "window" else {}
  q_positions = np.array([[fill - 9, fill - 4, fill - 1, EMPTY, 17]] * batch, np.int32)
  q = rng.standard_normal((batch, 5, heads, dim)).astype(np.float32)
  k_global = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
  v_global = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
  columns = np.arange(capacity)  # column d * local + l holds global slot l * N + d
  order = (columns % local) * ring_size + columns // local
  positions = np.where(order < fill, order, EMPTY)[None].repeat(batch, 0).astype(np.int32)
  past_blocks = (columns % local) >= -(-(fill // ring_size + 1) // 128) * 128
  k = np.transpose(k_global[:, :, order], (0, 1, 3, 2))  # [B, K, D, C]
  v = v_global[:, :, order]
  v[:, :, past_blocks] = np.nan
  scales = {}
  if cache == "int8":
    k, k_scale = quantized.quantize(k, 2)
    v, v_scale = quantized.quantize(np.nan_to_num(v), 3)
    v_scale = jnp.where(past_blocks, jnp.nan, v_scale)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    k_float = (np.asarray(k, np.float64) * np.asarray(k_scale)[:, :, None, :]).transpose(0, 1, 3, 2)
    v_float = np.asarray(v, np.float64) * np.asarray(v_scale)[..., None]
  elif cache == "bfloat16-bits":
    k, v = (jnp.asarray(x, jnp.bfloat16) for x in (k, v))
    k_float = np.asarray(k.astype(jnp.float32), np.float64).transpose(0, 1, 3, 2)
    v_float = np.asarray(v.astype(jnp.float32), np.float64)
    k, v = (jax.lax.bitcast_convert_type(x, jnp.uint16) for x in (k, v))  # BITS_OF
  else:
    k_float, v_float = k.transpose(0, 1, 3, 2).astype(np.float64), v.astype(np.float64)
  out = jax.jit(lambda *a: cache_attention(*a, mesh=mesh, **scales, **window, impl=impl))(
      q, k, v, positions, q_positions)

  real = [0, 1, 2, 4]  # the padding query's output is not compared (nor used)
  slots = (order < fill).nonzero()[0]  # the filled columns, any order
  qg = q[:, real].astype(np.float64).reshape(batch, 4, kv_heads, heads // kv_heads, dim)
  scores = np.einsum("blkgd,bkcd->bkglc", qg, k_float[:, :, slots]) / np.sqrt(dim)
  kv_pos, q_pos = order[slots][None, None, None, None, :], q_positions[0, real][:, None]
  seen = kv_pos <= q_pos
  if window:
    seen &= (kv_pos > q_pos - 40) | (kv_pos < 3)
  weights = np.exp(np.where(seen, scores, -np.inf) - np.where(seen, scores, -np.inf).max(
      -1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum("bkglc,bkcd->blkgd", weights, v_float[:, :, slots]).reshape(
      batch, 4, heads, dim)
  tolerance = {"int8": 1e-2, "bfloat16-bits": 1e-2}.get(cache, 1e-5)
  assert np.isfinite(np.asarray(out)).all()
  assert _relative_error(np.asarray(out)[:, real], expected) < tolerance


@pytest.mark.parametrize("axes", [{"sequence": 8}, {"data": 2, "sequence": 4}],
                         ids=["seq8", "data2-seq4"])
@pytest.mark.parametrize("order", ["natural", "zigzag"])
@pytest.mark.parametrize("window,sinks", [(20, 0), (7, 3)])
def test_ring_attention_with_a_window(axes, order, window, sinks, rng):
  """A sliding window (and sinks) on the ring, forward and gradients, against float64:
  packed documents, GQA, both token orders (the shortened ring in natural order)."""
  mesh = make_mesh(axes)
  ring_size = mesh.shape["sequence"]
  q, k, v, positions, _, segments, _, dout = attention_inputs(
      rng, batch=2, q_len=128, q_heads=4, kv_heads=2, head_dim=16, doc_len=90)
  if order == "zigzag":
    q, k, v, positions, segments, dout = (
        layout.to_zigzag(x, ring_size) for x in (q, k, v, positions, segments, dout))

  def attend(q, k, v):
    return ring_attention(q, k, v, positions=positions, segment_ids=segments, mesh=mesh,
                          block_q=8, block_kv=8, window=window, sinks=sinks)

  out, grad_fn = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v))(q, k, v)
  grads = jax.jit(grad_fn)(dout)
  opts = dict(window=window, sinks=sinks)
  ref_out, _ = reference.attention(q, k, v, positions, positions, segments, segments, **opts)
  ref_grads = reference.attention_grads(q, k, v, positions, positions, segments, segments, dout,
                                        **opts)
  assert _relative_error(out, ref_out) < 1e-5
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert _relative_error(grad, ref_grad) < 1e-5, name


@pytest.mark.parametrize("order,window,sinks,expected", [
    ("natural", 20, 0, 3),   # 16 tokens per device: the own block and two before it
    ("natural", 16, 0, 2),
    ("natural", 1, 0, 1),    # every query sees itself only: no transfer at all
    ("natural", 20, 2, 8),   # sinks: everyone needs device 0's block
    ("natural", 0, 0, 8),
    ("zigzag", 20, 0, 8),    # the second chunk needs the next device's: all the way round
])
def test_the_ring_shortens_with_a_window(order, window, sinks, expected):
  mesh = make_mesh({"sequence": 8})
  positions = np.arange(128, dtype=np.int32)[None]
  if order == "zigzag":
    positions = layout.to_zigzag(positions, 8)
  segments = np.ones_like(positions)

  def steps(positions, segments):
    count = ring._steps_needed(positions, segments, axis="sequence", ring_size=8, causal=True,
                               window=window, sinks=sinks)
    return jax.numpy.full((1,), 8 if count is None else count)

  counts = jax.jit(jax.shard_map(steps, mesh=mesh, in_specs=jax.P(None, "sequence"),
                                 out_specs=jax.P("sequence")))(positions, segments)
  np.testing.assert_array_equal(np.asarray(counts), expected)
