"""AdamW with linear warmup and cosine decay, global-norm clipping, no decay on norms and
biases (`train` section of the config: lr, warmup_steps, steps, min_lr_ratio, b1, b2,
weight_decay, grad_clip)."""

import jax
import optax


def make_optimizer(train_config, params):
  """(optax transformation, learning-rate schedule) for the parameters `params` (a pytree
  of arrays or shapes: only their ranks are read)."""
  config = train_config
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=max(config.warmup_steps, 1),
      decay_steps=max(config.steps, config.warmup_steps + 1),
      end_value=config.lr * config.min_lr_ratio)
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)  # no decay on norms and biases
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                   optax.adamw(schedule, b1=config.b1, b2=config.b2,
                               weight_decay=config.weight_decay, mask=decay_mask))
  return tx, schedule
