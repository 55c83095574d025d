"""The training state: parameters and optimizer state, created already sharded."""

import dataclasses

import jax
import optax
from flax import nnx

from model import transformer
from model.config import AttentionConfig, ModelConfig
from training.optimizer import make_optimizer


@dataclasses.dataclass
class TrainState:
  graphdef: nnx.GraphDef   # the model's structure (nnx.merge(graphdef, params) is the model)
  params: dict             # nnx pure dict of arrays, each sharded by its logical axes
  opt_state: optax.OptState  # sharded like the parameters; step counts replicated
  tx: optax.GradientTransformation
  schedule: optax.Schedule

  @property
  def shardings(self):
    """(params, opt_state) shardings: what the train step returns and expects."""
    return jax.tree.map(lambda x: x.sharding, (self.params, self.opt_state))

  def abstract(self):
    """(params, opt_state) as jax.ShapeDtypeStructs with their shardings (restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        (self.params, self.opt_state))


def init_state(model_config: ModelConfig, train_config, mesh, seed: int,
               attention: AttentionConfig = AttentionConfig()) -> TrainState:
  """A fresh model (`seed`) and its optimizer state on `mesh`; `train_config` is the
  config's `train` section (training/optimizer.py reads it)."""
  model = transformer.create(model_config, mesh, seed, attention)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  tx, schedule = make_optimizer(train_config, params)
  opt_state = jax.jit(tx.init)(params)
  replicated = jax.NamedSharding(mesh, jax.P())  # scalars (step counts) live on every device
  opt_state = jax.device_put(opt_state, jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, jax.NamedSharding) else replicated,
      opt_state))
  return TrainState(graphdef, params, opt_state, tx, schedule)
