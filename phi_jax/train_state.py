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
from phi_jax.lora import LoraConfig
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
    # LoRA (phi_jax/lora.py): `params` holds the adapters (nnx.LoRAParam) only, and `frozen` the base parameters,
    # which get no gradient and no optimizer state. None in full training. Checkpoints leave it out
    # (phi_jax.trainer.Trainer.checkpointed): they name the base model instead.
    frozen: Any = None


@struct.dataclass
class CheckpointedState:
    """What a checkpoint holds of a TrainState: every field but `frozen` (a LoRA run's base, which the checkpoint
    names instead), so its tree is the one full-training checkpoints have always had."""

    step: jax.Array
    params: Any
    opt_state: Any
    loss_scale: LossScale
    skipped: jax.Array
    total_skipped: jax.Array
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def of(cls, state: TrainState) -> CheckpointedState:
        return cls(step=state.step, params=state.params, opt_state=state.opt_state, loss_scale=state.loss_scale,
                   skipped=state.skipped, total_skipped=state.total_skipped, graphdef=state.graphdef, tx=state.tx)

    def with_frozen(self, frozen) -> TrainState:
        """The TrainState of this checkpoint and a frozen base (None in full training)."""
        return TrainState(step=self.step, params=self.params, opt_state=self.opt_state, loss_scale=self.loss_scale,
                          skipped=self.skipped, total_skipped=self.total_skipped, graphdef=self.graphdef, tx=self.tx,
                          frozen=frozen)


def split_params(model: Phi) -> tuple[nnx.GraphDef, dict, dict | None]:
    """(graphdef, trainable parameters, frozen parameters) as plain dicts: every nnx.Param is trainable in full
    training (frozen None); with LoRA only the nnx.LoRAParams are, and the base parameters are frozen."""
    if model.lora is None:
        graphdef, params = nnx.split(model, nnx.Param)
        return graphdef, nnx.to_pure_dict(params), None
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
    return graphdef, nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)


def logical_names(cfg: PhiConfig, compute: Compute, lora: LoraConfig | None = None) -> tuple[dict, dict | None]:
    """The logical axis names of every (trainable, frozen) parameter: dicts shaped like `split_params`' two (they
    do not depend on `compute`, which is the run's resolved one: nothing is resolved for another platform)."""
    abstract = nnx.eval_shape(lambda: Phi(cfg, compute, rngs=nnx.Rngs(params=0), lora=lora))
    as_names = lambda state: nnx.to_pure_dict(jax.tree.map(lambda v: v.out_sharding, state,
                                                          is_leaf=lambda x: isinstance(x, nnx.Variable)))
    if lora is None:
        return as_names(nnx.state(abstract, nnx.Param)), None
    _, adapters, base = nnx.split(abstract, nnx.LoRAParam, nnx.Param)
    return as_names(adapters), as_names(base)


def fresh_loss_scale(compute: Compute) -> LossScale:
    """float16 compute gets a dynamic loss scale (its gradients underflow otherwise); other dtypes a static 1."""
    return LossScale.create(dynamic=compute.dtype == jnp.float16)


def init_state(cfg: PhiConfig, compute: Compute, tx: optax.GradientTransformation, seed: int,
               lora: LoraConfig | None = None) -> TrainState:
    """A freshly initialised train state (jit it with out_shardings to create it sharded; eval_shape it for its
    shapes). The model's layers are stacked: the train step scans over them. With `lora`, the optimizer state
    covers the adapters only."""
    graphdef, params, frozen = split_params(Phi(cfg, compute, rngs=nnx.Rngs(params=seed), lora=lora))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), loss_scale=fresh_loss_scale(compute),
                      skipped=zero, total_skipped=zero, graphdef=graphdef, tx=tx, frozen=frozen)


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(cfg: PhiConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: dict | None = None,
                    opt_rules: dict | None = None, *, compute: Compute = Compute(),
                    lora: LoraConfig | None = None) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings). Parameters (trainable and frozen) follow `rules`; optimizer moments (the leaves
    whose dict path is a trainable parameter's) follow `opt_rules`, so ZeRO can shard moments further than
    parameters; the rest is replicated."""
    abstract = jax.eval_shape(lambda: init_state(cfg, compute, tx, 0, lora))
    is_names = lambda x: isinstance(x, tuple)
    names, frozen_names = logical_names(cfg, compute, lora)
    to_sharding = lambda tree: jax.tree.map(lambda n: NamedSharding(mesh, logical_to_spec(n, rules)), tree,
                                            is_leaf=is_names)
    param_sh = to_sharding(names)
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
        skipped=replicated, total_skipped=replicated,
        frozen=None if frozen_names is None else to_sharding(frozen_names))
    return abstract, shardings
