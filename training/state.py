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
  config's `train` section (training/optimizer.py reads it; shard_state_over_sequence
  splits the state over the ring too)."""
  model = transformer.create(model_config, mesh, seed, attention,
                             over_sequence=train_config.shard_state_over_sequence)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  tx, schedule = make_optimizer(train_config, params)
  # Sharded like the parameters (left to itself, XLA replicates the zeros of AdamW's
  # moments on every device: 2x the parameters' bytes on each).
  shardings = jax.tree.map(lambda x: x.sharding, _like_params(jax.eval_shape(tx.init, params),
                                                              params, mesh))
  opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
  return TrainState(graphdef, params, opt_state, tx, schedule)


def abstract_state(model_config: ModelConfig, train_config, mesh,
                   attention: AttentionConfig = AttentionConfig()) -> TrainState:
  """The TrainState `init_state` would create, as jax.ShapeDtypeStructs with their
  shardings: nothing is allocated, so `mesh` may hold devices this host does not have
  (compile-only TPU devices, tools/aot.py); shardings as `init_state` gives them."""
  graphdef, params = transformer.abstract_params(
      model_config, mesh, attention, over_sequence=train_config.shard_state_over_sequence)
  tx, schedule = make_optimizer(train_config, params)
  return TrainState(graphdef, params, _like_params(jax.eval_shape(tx.init, params), params,
                                                   mesh), tx, schedule)


def _like_params(opt_shapes, params, mesh):
  """The optimizer state's shapes with shardings: a leaf that mirrors a parameter (AdamW's
  mu and nu: the parameter's path is the tail of its path) is sharded like it, the rest
  (step counts) replicated."""
  by_path = {tuple(path): leaf.sharding
             for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  replicated = jax.NamedSharding(mesh, jax.P())

  def place(path, leaf):
    found = next((s for p, s in by_path.items() if len(p) <= len(path)
                  and tuple(path[-len(p):]) == p), replicated)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=found if leaf.ndim else replicated)
  return jax.tree_util.tree_map_with_path(place, opt_shapes)
