"""The training state (a pytree), how to initialise it, and the sharding of each of its leaves.

phi_jax.trainer.build_trainer puts these together for a mesh; `Trainer.init_state` creates the state directly in
its shardings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phi_jax.config import Compute, PhiConfig
from phi_jax.model import Phi
from phi_jax.optim import LossScale
from phi_jax.sharding import logical_to_spec


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # a plain dict of arrays, the model's nnx.Param state
    opt_state: Any
    loss_scale: LossScale
    skipped: jax.Array  # consecutive updates skipped for non-finite loss or gradients
    total_skipped: jax.Array
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def logical_names(cfg: PhiConfig, compute: Compute) -> dict:
    """The logical axis names of every parameter (a dict shaped like the params; they do not depend on compute)."""
    abstract = nnx.eval_shape(lambda: Phi(cfg, compute, rngs=nnx.Rngs(params=0)))
    names = jax.tree.map(lambda v: v.out_sharding, nnx.state(abstract, nnx.Param),
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(names)


def fresh_loss_scale(compute: Compute) -> LossScale:
    """float16 compute gets a dynamic loss scale (its gradients underflow otherwise); other dtypes a static 1."""
    return LossScale.create(dynamic=compute.dtype == jnp.float16)


def init_state(cfg: PhiConfig, compute: Compute, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A freshly initialised train state (jit it with out_shardings to create it sharded; eval_shape it for its
    shapes). The model's layers are stacked: the train step scans over them."""
    model = Phi(cfg, compute, rngs=nnx.Rngs(params=seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), loss_scale=fresh_loss_scale(compute),
                      skipped=zero, total_skipped=zero, graphdef=graphdef, tx=tx)


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(cfg: PhiConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: dict | None = None,
                    opt_rules: dict | None = None, *, compute: Compute = Compute()) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings). Parameters follow `rules`; optimizer moments (the leaves whose dict path is a
    parameter's) follow `opt_rules`, so ZeRO can shard moments further than parameters; the rest is replicated."""
    abstract = jax.eval_shape(lambda: init_state(cfg, compute, tx, 0))
    is_names = lambda x: isinstance(x, tuple)
    names = logical_names(cfg, compute)
    param_sh = jax.tree.map(lambda n: NamedSharding(mesh, logical_to_spec(n, rules)), names, is_leaf=is_names)
    names_by_path = {_dict_keys(p): n for p, n in jax.tree_util.tree_flatten_with_path(names, is_leaf=is_names)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def opt_leaf(path, leaf):
        n = names_by_path.get(_dict_keys(path))
        if n is None or len(n) != leaf.ndim:
            return replicated
        return NamedSharding(mesh, logical_to_spec(n, opt_rules or rules))

    shardings = abstract.replace(
        step=replicated, params=param_sh,
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, abstract.opt_state),
        loss_scale=jax.tree.map(lambda _: replicated, abstract.loss_scale),
        skipped=replicated, total_skipped=replicated)
    return abstract, shardings
