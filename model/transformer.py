"""A Llama-family transformer in Flax NNX, read top to bottom.

  tokens [B, L] ─► embed ─► n_layers × (x + attn(norm(x)); x + mlp(norm(x))) ─► norm ─► logits [B, L, V]

Dimension letters (core/__init__.py): B batch, L tokens, M model dim, H query heads,
K kv heads, D head dim, F SwiGLU hidden, V vocabulary.

Attention is `parallel.ring.ring_attention` over the mesh's `sequence` axis: with
sequence = 1 the ring has one device and the same code runs. Masks come from
`positions` and `segment_ids`, so the tokens may come in any order (train.py feeds
the zigzag order of parallel/layout.py); logits come back in the order given.

One forward serves training, prefill and decode (`Transformer.forward`): without a
cache it attends over its own tokens and also returns every layer's keys and values
(a prefill's cache, model/kv_cache.py); with a cache it decodes one token per row,
writing its keys and values into the cache and attending over it
(`ring.cache_attention`).

Every parameter names its logical axes (`logical_axes` metadata) and activations are
constrained by logical names; parallel/sharding.py maps both to the mesh. A token
axis is split over the ring unless a row holds one token (sharding.tokens_axis, decided
once per forward).
Parameters are stored in `param_dtype` and cast to `dtype` for compute; every
projection accumulates in float32 (model/matmul.py); norms, softmax statistics and
logits are float32.
"""

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model import kv_cache, loss, quantize, rope
from model.matmul import project
from model.config import AttentionConfig, ConfigError, ModelConfig
from model.kv_cache import KVCache, SlotCache
from parallel import ring, sharding


def _param(rngs, shape, logical_axes, config: ModelConfig, std=None):
  std = config.init_std if std is None else std
  init = jax.random.normal(rngs.params(), shape, jnp.float32) * std
  return nnx.Param(init.astype(config.param_dtype), logical_axes=logical_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(weight, mesh, axes):
  """`weight` constrained to the logical `axes` on `mesh`; its gradient left unconstrained."""
  return sharding.constrain(weight, mesh, axes)


def _gather_fwd(weight, mesh, axes):
  return _gather(weight, mesh, axes), None


def _gather_bwd(mesh, axes, _, grad):
  return (grad,)


_gather.defvjp(_gather_fwd, _gather_bwd)


def _gathered(param: nnx.Param, mesh, dtype=None):
  """A weight as a projection uses it: split as at rest over fsdp (its model dimension,
  ZeRO-3) and tensor, gathered over the ring when training split it there too
  (train.shard_state_over_sequence; a no-op otherwise). Said rather than left to GSPMD,
  which with the weights split over the ring moved the activations instead (Llama-3-8B
  at 1M tokens on v5p-128: 95 GiB of temporaries per chip). The gradient is not
  constrained: GSPMD reduce-scatters it into the parameter's layout.

  `dtype`: cast before the gather (model.gather_in_compute_dtype), so float32 master
  weights travel and are held gathered in bf16, half the bytes; the projections compute
  in it anyway, but their weight gradients are then rounded to it too."""
  value = ring.held_values(param[...])  # (the cast's gradient is cast back to its dtype)
  axes = param.get_metadata()["logical_axes"]
  if value.ndim == 2 and len(axes) == 3:  # [H·D, M]: heads_as_matrices
    axes = (axes[1], axes[0])
  return _gather(value.astype(dtype or value.dtype), mesh, axes)


def _gather_dtype(config: ModelConfig):
  """The dtype weights are gathered in: the compute dtype with
  model.gather_in_compute_dtype, else None (as stored)."""
  return config.dtype if config.gather_in_compute_dtype else None


HEAD_WEIGHTS = ("wq", "wk", "wv")  # [M, H, D] (or K kv heads): the ones heads_as_matrices folds


def heads_as_matrices(state: nnx.State) -> nnx.State:
  """`state` (of nnx.split(model); arrays or jax.ShapeDtypeStructs) with every
  unquantized q/k/v weight [M, H, D] as the matrix [H·D, M] (H·D split as H was), which
  Attention reads the same way; `state` itself is left as it was. For serving: XLA:TPU
  tiles the last two dims of a bf16 array, so [M, H, D] read as a matrix is a re-tiling
  copy, and the decode loop of two or more rows hoisted one copy of every q/k/v weight
  out of it (Llama-2-7B: 96 x 32 MiB, 3 GiB per chip of temporaries from one request to
  two); held as [M, H·D] it was copied to its transpose, so it is held transposed.
  Training keeps [M, H, D] (checkpoints too)."""
  flat = nnx.to_flat_state(state)
  names = {path for path, _ in flat}
  return nnx.from_flat_state([
      (path, variable.replace(value=_as_matrix(variable.get_value()))
       if (path[-1] in HEAD_WEIGHTS and variable.get_value().ndim == 3
           and path[:-1] + (path[-1] + "_scale",) not in names) else variable)
      for path, variable in flat])


def serving_layout(state: nnx.State, platform: str) -> nnx.State:
  """`state` (of nnx.split(model); arrays or jax.ShapeDtypeStructs) as the serving
  engines hold it on `platform` ("cpu", "tpu", "gpu"): heads_as_matrices, and on CPU a
  bfloat16 embedding table held as its bits (uint16; the forward reads the rows'
  values, ring.held_values). XLA:CPU converted the whole bfloat16 table to float32
  before gathering a few rows from it, once per program call: the 58M model's
  [32000, 512] table, ~22 ms of each 4-step decode call. `state` itself is unchanged."""
  state = heads_as_matrices(state)
  if platform != "cpu":
    return state
  return nnx.from_flat_state([
      (path, variable.replace(value=_as_bits(variable.get_value()))
       if path == ("embed",) and variable.get_value().dtype == jnp.bfloat16 else variable)
      for path, variable in nnx.to_flat_state(state)])


def hold_serving_layout(model) -> None:
  """serving_layout in place, on `model` (a Transformer): the old arrays are freed."""
  nnx.update(model, serving_layout(nnx.state(model), ring.platform_of(model.mesh)))


def _as_bits(value):
  """A bfloat16 array (or its jax.ShapeDtypeStruct) as its uint16 bits, sharded as it was."""
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(value.shape, jnp.uint16, sharding=value.sharding)
  return _program(_bits, value.sharding)(value)


def _bits(x):
  return ring.as_held(x, jnp.uint16)


@functools.cache
def _program(transform, sharding):
  """jax.jit(transform) onto `sharding`, one per (transform, sharding): the weights of
  every layer share its compiled programs (a jax.jit per weight lowered and looked each
  one up again: 24 q/k/v programs, 0.23 s of a 58M model's 1.2 s load)."""
  return jax.jit(transform, out_shardings=sharding)


def _as_matrix(value):
  """[M, H, D] -> [H·D, M], H·D split as H was (the third dim must be whole)."""
  rows, columns = value.shape[1] * value.shape[2], value.shape[0]
  sharding = getattr(value, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (3 - len(sharding.spec))
    if spec[2] is not None:
      return value
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.P(spec[1], spec[0]))
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((rows, columns), value.dtype, sharding=sharding)
  return _program(_matrix, sharding)(value)


def _matrix(x):
  return x.reshape(x.shape[0], -1).T


def _weight(module, name: str):
  """The weight `name` of `module` as its projection reads it: `_gathered`, and with
  model.quantize a quantize.QuantizedWeight of its values and `<name>_scale`."""
  param = getattr(module, name)
  scale = getattr(module, name + "_scale", None)
  if scale is None:
    return _gathered(param, module.mesh, _gather_dtype(module.config))
  return quantize.QuantizedWeight(_gathered(param, module.mesh), _gathered(scale, module.mesh),
                                  quantize.IN_AXES[name], quantize.group_of(module.config),
                                  activations=ring.platform_of(module.mesh) == "cpu")


def _project_heads(x, weight, heads: int):
  """x [B, L, M] times a q/k/v weight [M, H, D], or [H·D, M] (heads_as_matrices)
  -> [B, L, H, D]."""
  if not isinstance(weight, quantize.QuantizedWeight) and weight.ndim == 2:
    return project("blm,nm->bln", x, weight).reshape(*x.shape[:2], heads, -1)
  return project("blm,mhd->blhd", x, weight)


def quantized_modules(model) -> list:
  """[(layer or None, module)] of every module of `model` (a Transformer) holding
  weights of quantize.IN_AXES: the model itself (embed, lm_head; layer None), then
  each block's attention and MLP."""
  return [(None, model)] + [(layer, part) for layer, block in enumerate(model.blocks)
                            for part in (block.attn, block.mlp)]


def quantize_weights(model, config: ModelConfig, rounding=None) -> None:
  """Every weight of quantize.IN_AXES in `model` (a Transformer) replaced in place by
  its values quantized as `config` says (model.quantize, model.quantize_group), with a
  `<name>_scale` Param beside it (model/quantize.py). `rounding(layer, module, name,
  weight)` -> (values, scale) chooses them (model/calibration.py); default: to nearest."""
  group = quantize.group_of(config)
  held = quantize.held_dtype(config.quantize, model.mesh and ring.platform_of(model.mesh))
  if rounding is None:
    rounding = lambda layer, module, name, weight: quantize.quantize_weight(
        weight, name, config.quantize, group)
  for layer, module in quantized_modules(model):
    for name in quantize.IN_AXES:
      param = getattr(module, name, None)
      if not isinstance(param, nnx.Param) or not jnp.issubdtype(param[...].dtype, jnp.floating):
        continue
      axes = param.get_metadata()["logical_axes"]
      values, scale = rounding(layer, module, name, param[...])
      setattr(module, name, nnx.Param(values.astype(held), logical_axes=axes))
      setattr(module, name + "_scale", nnx.Param(
          scale, logical_axes=quantize.scale_axes(axes, quantize.IN_AXES[name], group)))


# Calibration (model/calibration.py): while `recording_inputs` is active, every forward
# appends the input of each group of projections here, by PROJECTION_INPUTS' names.
_RECORDED = contextvars.ContextVar("ringlm_recorded_projection_inputs", default=None)

# The projections that read each recorded input.
PROJECTION_INPUTS = {"attn": ("wq", "wk", "wv"), "wo": ("wo",), "mlp": ("w_gate", "w_up"),
                     "w_down": ("w_down",), "lm_head": ("lm_head",)}


@contextlib.contextmanager
def recording_inputs():
  """Within it, a forward records each projection group's input: yields {name of
  PROJECTION_INPUTS: [the input of each call, in layer order]}, the inputs as the
  forward made them (attn, mlp, lm_head [B, L, M] after their norm; wo [B, L, H, D];
  w_down [B, L, F]). Traced values when the forward is traced: return them from it."""
  recorded = {}
  token = _RECORDED.set(recorded)
  try:
    yield recorded
  finally:
    _RECORDED.reset(token)


def _record(name: str, x) -> None:
  recorded = _RECORDED.get()
  if recorded is not None:
    recorded.setdefault(name, []).append(x)


def _zeros(shape, logical_axes, config: ModelConfig):
  return nnx.Param(jnp.zeros(shape, config.param_dtype), logical_axes=logical_axes)


class RMSNorm(nnx.Module):

  def __init__(self, config: ModelConfig):
    self.eps = config.norm_eps
    self.scale = nnx.Param(jnp.ones((config.dim,), config.param_dtype), logical_axes=("norm",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

  def __init__(self, config: ModelConfig, mesh, attention: AttentionConfig, *, rngs):
    self.config, self.mesh, self.attention = config, mesh, attention
    dim, heads, kv_heads, head_dim = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
    self.wq = _param(rngs, (dim, heads, head_dim), ("embed", "heads", "head_dim"), config)
    self.wk = _param(rngs, (dim, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), config)
    self.wv = _param(rngs, (dim, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), config)
    self.wo = _param(rngs, (heads, head_dim, dim), ("heads", "head_dim", "embed"), config)
    if config.qkv_bias:  # Qwen2
      self.bq = _zeros((heads, head_dim), ("heads", "head_dim"), config)
      self.bk = _zeros((kv_heads, head_dim), ("kv_heads", "head_dim"), config)
      self.bv = _zeros((kv_heads, head_dim), ("kv_heads", "head_dim"), config)

  def __call__(self, x, cos, sin, positions, segment_ids, cache: KVCache | SlotCache | None,
               layer: int, tokens_axis):
    """(output [B, L, M], (k, v)): this call's keys/values [B, L, K, D] without a
    cache; with one, the layer's updated cache arrays (keys, values, key scales, value
    scales: kv_cache.write_layer)."""
    dtype = self.config.dtype
    weight = functools.partial(_weight, self)
    _record("attn", x)
    q, k, v = (_project_heads(x, weight(name), heads)
               for name, heads in (("wq", self.config.n_heads),
                                   ("wk", self.config.n_kv_heads),
                                   ("wv", self.config.n_kv_heads)))
    if self.config.qkv_bias:
      q, k, v = (y + b[...].astype(dtype) for y, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
    q = sharding.constrain(rope.apply_rotary(q, cos, sin), self.mesh,
                           ("batch", tokens_axis, "heads", "head_dim"))
    k = sharding.constrain(rope.apply_rotary(k, cos, sin), self.mesh,
                           ("batch", tokens_axis, "kv_heads", "head_dim"))
    v = sharding.constrain(v, self.mesh, ("batch", tokens_axis, "kv_heads", "head_dim"))
    window = dict(window=self.config.layer_window(layer), sinks=self.config.layer_sinks(layer))
    if cache is None:
      out = ring.ring_attention(q, k, v, positions=positions, segment_ids=segment_ids,
                                causal=True, mesh=self.mesh, impl=self.attention.impl,
                                block_q=self.attention.block_q, block_kv=self.attention.block_kv,
                                **window)
      _record("wo", out)
      return project("blhd,hdm->blm", out, weight("wo")), (k, v)
    if isinstance(cache, SlotCache):  # L tokens per row at the row's own fill
      write = lambda array, new, slot_axis: cache.write(array, new, slot_axis, self.mesh)
      live = dict(live=cache.live, live_rows=cache.live_rows, row_slots=cache.row_slots,
                  row_buckets=cache.row_buckets)
    else:  # one token per row at decode step cache.step
      write = lambda array, new, slot_axis: ring.cache_write(
          array, new, cache.step, cache.prompt_slots, slot_axis=slot_axis, mesh=self.mesh)
      live = {}
    layer_cache = kv_cache.write_layer(cache, layer, k, v, write)
    k_cache, v_cache, k_scale, v_scale = layer_cache
    out = ring.cache_attention(q, k_cache, v_cache, cache.positions, positions, mesh=self.mesh,
                               k_scale=k_scale, v_scale=v_scale, **live, **window)
    return project("blhd,hdm->blm", out, weight("wo")), layer_cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig, mesh, *, rngs):
    self.config, self.mesh = config, mesh
    self.w_gate = _param(rngs, (config.dim, config.mlp_dim), ("embed", "mlp"), config)
    self.w_up = _param(rngs, (config.dim, config.mlp_dim), ("embed", "mlp"), config)
    self.w_down = _param(rngs, (config.mlp_dim, config.dim), ("mlp", "embed"), config)

  def __call__(self, x, tokens_axis):
    weight = functools.partial(_weight, self)
    _record("mlp", x)
    gate = project("blm,mf->blf", x, weight("w_gate"))
    up = project("blm,mf->blf", x, weight("w_up"))
    hidden = sharding.constrain(jax.nn.silu(gate) * up, self.mesh, ("batch", tokens_axis, "mlp"))
    _record("w_down", hidden)
    return project("blf,fm->blm", hidden, weight("w_down"))


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, config: ModelConfig, mesh, attention: AttentionConfig, *, rngs):
    self.mesh = mesh
    self.attn_norm = RMSNorm(config)
    self.attn = Attention(config, mesh, attention, rngs=rngs)
    self.mlp_norm = RMSNorm(config)
    self.mlp = MLP(config, mesh, rngs=rngs)

  def __call__(self, x, cos, sin, positions, segment_ids, cache, layer, tokens_axis):
    attended, kv = self.attn(self.attn_norm(x), cos, sin, positions, segment_ids, cache, layer,
                             tokens_axis)
    x = x + attended
    x = x + self.mlp(self.mlp_norm(x), tokens_axis)
    return sharding.constrain(x, self.mesh, ("batch", tokens_axis, "act_embed")), kv


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):

  def __init__(self, config: ModelConfig, mesh, attention: AttentionConfig = AttentionConfig(),
               *, rngs: nnx.Rngs):
    self.config, self.mesh = config, mesh
    self.embed = _param(rngs, (config.vocab_size, config.dim), ("vocab", "embed"), config, std=1.0)
    self.blocks = nnx.List([Block(config, mesh, attention, rngs=rngs)
                            for _ in range(config.n_layers)])
    self.final_norm = RMSNorm(config)
    if not config.tie_embeddings:
      # [V, M] like the embedding table: one output row per token, which makes the
      # decode step's head matmul (32 rows x 32000 outputs) ~20% faster on XLA:CPU.
      self.lm_head = _param(rngs, (config.vocab_size, config.dim), ("vocab", "embed"), config)
    if config.quantize:
      quantize_weights(self, config)

  def __call__(self, tokens, positions, segment_ids=None):
    """Logits for every token (training and scoring).

    Args:
      tokens: [B, L] int32 token ids; batch over (data, fsdp), L over sequence.
      positions: [B, L] int32 position of each token in its document (RoPE and
        the causal mask use these, so any token order is valid).
      segment_ids: [B, L] int32 document id of each token in a packed row (tokens
        attend only within their document), or None for one document per row.
    Returns:
      logits [B, L, vocab] float32, sharded (batch, sequence, vocab).
    """
    hidden, _ = self.forward(tokens, positions, segment_ids)
    return self.head(hidden)

  def forward(self, tokens, positions, segment_ids=None,
              cache: KVCache | SlotCache | None = None):
    """The transformer up to the final norm: training, prefill and decode.

    Without `cache`: tokens, positions, segment_ids as in `__call__` ([B, L], L over
    sequence); returns (hidden [B, L, M], per-layer (k, v) [B, L, K, D] sharded
    (batch, sequence, kv_heads)), the keys and values a prefill caches.
    With `cache`: tokens, positions [B, 1] (one new token per row, batch-sharded);
    returns (hidden [B, 1, M], the cache with this token written at decode step
    `cache.step` and the step advanced).
    With a SlotCache (continuous batching): tokens, positions [B, L] (L new tokens per
    row, whole on every device; positions EMPTY at padding), written at each row's
    `cache.fill`; returns (hidden [B, L, M], the cache with fill advanced by L).
    """
    config = self.config
    tokens_axis = sharding.tokens_axis(tokens.shape[1])
    cos, sin = rope.rotary_tables(config.rope, config.head_dim, positions)
    # FSDP gathers the table's model dimension before the lookup, as for any weight.
    if config.quantize:
      x = quantize.embed(_weight(self, "embed"), tokens, config.dtype)  # [B, L, M]
    else:
      table = sharding.constrain(self.embed[...], self.mesh, ("vocab", None))
      # (a table held as its bits, serving_layout: the rows' values)
      x = ring.held_values(jnp.take(table, tokens, axis=0)).astype(config.dtype)  # [B, L, M]
    x = sharding.constrain(x, self.mesh, ("batch", tokens_axis, "act_embed"))
    if isinstance(cache, SlotCache):
      tokens_axis = None  # a chunk's queries attend on every device of the ring
      x = sharding.constrain(x, self.mesh, ("batch", None, "act_embed"))
      cache = dataclasses.replace(cache, positions=cache.write(
          cache.positions, positions, ring.POSITION_SLOTS, self.mesh))
    elif cache is not None:  # every layer sees the new token's position in its slot
      cache = dataclasses.replace(cache, positions=ring.cache_write(
          cache.positions, positions, cache.step, cache.prompt_slots,
          slot_axis=ring.POSITION_SLOTS, mesh=self.mesh))

    def run_block(block, x, layer):
      return block(x, cos, sin, positions, segment_ids, cache, layer, tokens_axis)

    if config.remat != "none":
      run_block = nnx.remat(run_block, policy=_REMAT_POLICIES[config.remat], static_argnums=(2,))
    layer_kv = []
    for layer, block in enumerate(self.blocks):
      x, kv = run_block(block, x, layer)
      layer_kv.append(kv)

    x = self.final_norm(x)
    if cache is None:
      return x, tuple(layer_kv)
    keys, values, key_scales, value_scales = zip(*layer_kv)
    cache = dataclasses.replace(cache, keys=keys, values=values, **(dict(
        key_scales=key_scales, value_scales=value_scales) if cache.key_scales else {}))
    if isinstance(cache, SlotCache):
      return x, dataclasses.replace(cache, fill=cache.fill + tokens.shape[1])
    return x, dataclasses.replace(cache, step=cache.step + 1)

  def target_log_probs(self, hidden, targets):
    """log p(target) of every token from the final hidden states (training's loss):
    hidden [B, L, M] from `forward`, targets [B, L] int32, both sharded (batch,
    sequence) -> [B, L] float32. With model.head_chunk the [B, L, V] logits are formed
    one chunk at a time (model/loss.py)."""
    config = self.config
    if not config.head_chunk or hidden.shape[1] <= 1 or config.quantize:
      return loss.target_log_probs(self.head(hidden), targets)
    head = _gathered(self.embed if config.tie_embeddings else self.lm_head, self.mesh,
                     _gather_dtype(config))
    return loss.chunked_target_log_probs(hidden, head, targets, chunk=config.head_chunk,
                                         mesh=self.mesh, dtype=config.dtype)

  def head(self, hidden):
    """hidden [B, L, M] (after the final norm) -> logits [B, L, V] float32."""
    config = self.config
    head = _weight(self, "embed" if config.tie_embeddings else "lm_head")  # [V, M]
    _record("lm_head", hidden)
    logits = project("blm,vm->blv", hidden.astype(config.dtype), head, jnp.float32)
    return sharding.constrain(logits, self.mesh,
                              ("batch", sharding.tokens_axis(hidden.shape[1]), "vocab"))


def create(config: ModelConfig, mesh, seed: int = 0,
           attention: AttentionConfig = AttentionConfig(), *,
           over_sequence: bool = False) -> Transformer:
  """A Transformer whose parameters are created already sharded on `mesh`
  (`over_sequence`: the model dimension split over fsdp x sequence, for training;
  parallel/sharding.param_specs).

  Initialisation runs inside jit with `out_shardings`, so no host ever holds a full
  copy of the parameters. The values depend on `seed` only, not on the mesh.
  """
  make = lambda: Transformer(config, mesh, attention, rngs=nnx.Rngs(seed))
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
  shardings = sharding.param_shardings(abstract_state, mesh, over_sequence=over_sequence)
  state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def abstract_params(config: ModelConfig, mesh, attention: AttentionConfig = AttentionConfig(),
                    *, over_sequence: bool = False):
  """(graphdef, parameters) of a model of `config` on `mesh`, the parameters a pure dict of
  jax.ShapeDtypeStructs with their shardings (`over_sequence` as for `create`): nothing
  is allocated, so `mesh` may hold compile-only devices."""
  make = lambda: Transformer(config, mesh, attention, rngs=nnx.Rngs(0))
  graphdef, shapes = nnx.split(nnx.eval_shape(make))
  shardings = nnx.to_pure_dict(sharding.param_shardings(shapes, mesh,
                                                        over_sequence=over_sequence))
  return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nnx.to_pure_dict(shapes), shardings)


def abstract(path: str, mesh, attention: AttentionConfig = AttentionConfig(),
             **model_overrides) -> tuple[Transformer, str, dict]:
  """(model, checkpoint step directory, its meta) where the model's parameters are
  jax.ShapeDtypeStructs with their shardings on `mesh`: what `load` will place there,
  known without reading a parameter (serve.py compiles while the checkpoint loads).
  Arguments as for `load`."""
  from model import checkpoint
  step_dir, meta = checkpoint.load_meta(path)
  config = dataclasses.replace(ModelConfig.from_dict(meta["config"]["model"]), **model_overrides)
  origin_window = (meta["config"].get("hf") or {}).get("sliding_window")
  if origin_window and not config.window:  # converted before ringlm applied windows
    raise ConfigError(f"{path} was converted from a model with sliding_window={origin_window} "
                      "by a ringlm that ignored it; convert it again with tools.convert_hf, "
                      f"or pass --config.model.window={origin_window}")
  graphdef, targets = abstract_params(config, mesh, attention)
  stored = _stored_config(config, meta)  # what the checkpoint holds (float or quantized)
  checkpoint.check_param_shapes(step_dir, targets if stored == config else
                                abstract_params(stored, mesh, attention)[1])
  return nnx.merge(graphdef, targets), step_dir, meta


def _stored_config(config: ModelConfig, meta: dict) -> ModelConfig:
  """`config` as the checkpoint of `meta` stores its parameters: float ones when it was
  not quantized (model.quantize then quantizes them as they load)."""
  saved_model = meta["config"]["model"]
  saved = saved_model.get("quantize", "")
  if config.quantize and not saved:
    return dataclasses.replace(config, quantize="")
  if saved and not config.quantize:
    raise ConfigError(f"the checkpoint's weights are {saved} (model.quantize={saved!r}); it "
                      "cannot be served or trained unquantized: serve it as it is, or use "
                      "the float checkpoint it came from")
  saved_group = saved_model.get("quantize_group", ModelConfig.quantize_group)
  if saved and (saved != config.quantize or (saved == "int4" and
                                              saved_group != config.quantize_group)):
    raise ConfigError(f"the checkpoint's weights are {saved} (model.quantize={saved!r}, "
                      f"model.quantize_group={saved_group}); serve them as they are (drop "
                      "serve.quantize) or quantize the float checkpoint they came from")
  return config


def load(path: str, mesh, attention: AttentionConfig = AttentionConfig(),
         **model_overrides) -> tuple[Transformer, dict]:
  """(model, checkpoint meta) from a run directory or checkpoint step (training runs and
  converted Hugging Face models alike), parameters placed straight onto `mesh`.

  The model's shape comes from the checkpoint's saved config; `model_overrides`
  replace fields that do not change the parameters (rope, max_seq_len, dtype, remat).
  """
  shapes, step_dir, _ = abstract(path, mesh, attention, **model_overrides)
  return load_parameters(shapes, step_dir)


def load_parameters(shapes: Transformer, step_dir: str) -> tuple[Transformer, dict]:
  """(model, checkpoint meta): the parameters of checkpoint `step_dir` read straight
  into the shapes and shardings of `shapes` (a model from `abstract`)."""
  from model import checkpoint
  graphdef, targets = nnx.split(shapes)
  targets = nnx.to_pure_dict(targets)
  stored = _stored_config(shapes.config, checkpoint.load_meta(step_dir)[1])
  if stored == shapes.config:
    params, meta = checkpoint.load_params(step_dir, targets,
                                          check_shapes=False)  # `abstract` checked them
    return nnx.merge(graphdef, params), meta
  # A float checkpoint served with quantized weights: read, then rounded where it lies.
  float_graphdef, float_targets = abstract_params(stored, shapes.mesh)
  float_params, meta = checkpoint.load_params(step_dir, float_targets, check_shapes=False)

  def quantized(params):
    model = nnx.merge(float_graphdef, params)
    quantize_weights(model, shapes.config)
    return nnx.to_pure_dict(nnx.state(model))

  shardings = jax.tree.map(lambda target: target.sharding, targets)
  params = jax.jit(quantized, out_shardings=shardings, donate_argnums=0)(float_params)
  return nnx.merge(graphdef, params), meta
