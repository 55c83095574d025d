"""The jit-compiled train and eval steps, on pure (params, opt_state) pytrees.

The train step never makes the host wait: what the loop needs every step stays on the
device (`Counters`: non-finite steps in a row and in all), and the host reads the
step's statistics only when it logs, evaluates or saves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx



def new_counters(mesh) -> dict:
  """The device-side counters a run starts with, replicated on `mesh`:
  bad_in_row (non-finite steps in a row, 0 after a good one) and skipped (in all)."""
  replicated = jax.NamedSharding(mesh, jax.P())
  return {name: jax.device_put(np.zeros((), np.int32), replicated)
          for name in ("bad_in_row", "skipped")}


def make_steps(graphdef, tx, grad_accum: int, state_shardings):
  """(train_step, eval_step), both jit-compiled.

  train_step(params, opt_state, counters, batch) -> (params, opt_state, counters, stats)
    batch: {"inputs", "targets", "positions", "segment_ids"} [B, L] int32, sharded
      ("batch", "sequence") (parallel/sharding.put_batch); B a multiple of grad_accum.
    stats: {"loss", "grad_norm", "finite", "tokens"} device scalars of this step.
    A step is applied only when its loss, gradients and new parameters are all finite;
    otherwise params and opt_state come back unchanged and the counters count it.
    params and opt_state are donated; counters are not (the loop reads the previous
    step's while this one runs).
  eval_step(params, batch) -> (sum of token losses, real tokens), device scalars.

  state_shardings: the (params, opt_state) shardings the train step returns, so every
  step sees the same input layout and compiles once.
  """
  replicated = jax.NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, jax.P())

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    hidden, _ = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"])
    real = (batch["segment_ids"] > 0).astype(jnp.float32)  # 0: padding
    return -(model.target_log_probs(hidden, batch["targets"]) * real).sum(), real.sum()

  def train_step(params, opt_state, counters, batch):
    def micro(carry, micro_batch):
      grads, loss_sum, tokens = carry
      (loss, count), grad = jax.value_and_grad(loss_fn, has_aux=True)(params, micro_batch)
      return (jax.tree.map(jnp.add, grads, grad), loss_sum + loss, tokens + count), None

    # [B, L] -> [grad_accum, B / grad_accum, L], micro-batch m = rows m, m + grad_accum, ...
    # so every data shard gives each micro-batch its share of rows; gradients summed.
    split = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss_sum, tokens), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), split)
    tokens = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    loss = loss_sum / tokens
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # A huge learning rate can overflow the update of finite gradients: the new
    # parameters are checked too.
    params_finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(new_params)]))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    bad = (~finite).astype(jnp.int32)
    counters = {"bad_in_row": (counters["bad_in_row"] + 1) * bad,
                "skipped": counters["skipped"] + bad}
    stats = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tokens": tokens}
    return keep(new_params, params), keep(new_opt_state, opt_state), counters, stats

  def eval_step(params, batch):
    return loss_fn(params, batch)

  counter_shardings = {"bad_in_row": replicated, "skipped": replicated}
  return (jax.jit(train_step, donate_argnums=(0, 1),
                  out_shardings=(*state_shardings, counter_shardings, None)),
          jax.jit(eval_step))
