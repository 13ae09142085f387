"""AdamW at constant learning rate (the phi-1.5 recipe), and dynamic loss scaling for float16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct


def learning_rate_schedule(learning_rate: float, warmup_steps: int = 0) -> optax.Schedule:
    """Constant (phi-1.5 used no warm-up); an optional linear warm-up for fine-tuning runs."""
    if warmup_steps <= 0:
        return optax.constant_schedule(learning_rate)
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)


def decay_mask(params) -> dict:
    """Weight decay on matrices (kernels, embeddings) only, not on biases or LayerNorm parameters."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embed_tokens"), params)


def make_optimizer(learning_rate: float, *, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-7,
                   weight_decay: float = 0.1, warmup_steps: int = 0, grad_clip_norm: float = 0.0
                   ) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(learning_rate, warmup_steps)
    # inject_hyperparams keeps the current learning rate in the optimizer state, where metrics read it.
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(learning_rate=schedule, b1=b1, b2=b2, eps=eps,
                                                  weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw) if grad_clip_norm > 0 else adamw


def current_learning_rate(opt_state) -> jax.Array:
    has_lr = lambda x: isinstance(getattr(x, "hyperparams", None), dict)
    found = [s.hyperparams["learning_rate"] for s in jax.tree.leaves(opt_state, is_leaf=has_lr) if has_lr(s)]
    if not found:
        raise ValueError("The optimizer state holds no learning rate; build it with phi_jax.optim.make_optimizer.")
    return found[0]


@struct.dataclass
class LossScale:
    """Dynamic loss scaling (as in mixed-precision fp16 training): halve on overflow, double after a run of
    `period` good steps. With `dynamic=False` the scale stays 1 (bf16 / fp32)."""

    scale: jax.Array
    good_steps: jax.Array
    dynamic: bool = struct.field(pytree_node=False, default=False)
    period: int = struct.field(pytree_node=False, default=1000)

    @classmethod
    def create(cls, dynamic: bool, initial_scale: float = 2.0**15, period: int = 1000) -> LossScale:
        return cls(jnp.asarray(initial_scale if dynamic else 1.0, jnp.float32), jnp.zeros((), jnp.int32),
                   dynamic, period)

    def update(self, finite: jax.Array) -> LossScale:
        if not self.dynamic:
            return self
        good = jnp.where(finite, self.good_steps + 1, 0)
        grow = good >= self.period
        scale = jnp.where(finite, jnp.where(grow, self.scale * 2.0, self.scale), jnp.maximum(self.scale / 2.0, 1.0))
        return self.replace(scale=scale, good_steps=jnp.where(grow, 0, good))
