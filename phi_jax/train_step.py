"""The pure training and evaluation steps: `train_step(state, batch) -> (state, metrics)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from phi_jax.lora import training_dropout
from phi_jax.optim import current_learning_rate
from phi_jax.sharding import activation_sharding, batch_sharding
from phi_jax.train_state import TrainState

Batch = dict[str, jax.Array]  # the keys of BATCH_DTYPES
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
                "loss_mask": jnp.float32}
LORA_DROPOUT_SEED = 0  # LoRA dropout's keys: this, folded with the step and the micro-batch (a resume draws the same)


def loss_sum(params, graphdef: nnx.GraphDef, batch: Batch, frozen=None) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies over the loss mask, number of target tokens counted), in float32. `frozen`:
    the base parameters of a LoRA model (`params` then holds its adapters)."""
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    logits, _ = model(batch["inputs"], batch["positions"], segment_ids=batch["segment_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from a global batch shaped [accum_steps, micro_batch, seq].

    The loss is the mean over the target tokens (loss_mask) of the whole global batch, not a mean of micro-batch
    means: gradients of the summed loss are accumulated over the micro-batches and divided by the total target
    count, so k micro-batches with uneven masks give exactly the update of one batch k times as large. Metrics
    report it as `tokens` (target tokens per step). A non-finite loss or gradient norm skips the update
    (parameters and optimizer state unchanged) and, under fp16, halves the loss scale. A LoRA state
    (`state.frozen` set) trains its adapters only; its dropout draws one key per (step, micro-batch).
    """
    accum, micro, seq = batch["inputs"].shape
    denom = float(accum * micro * seq)  # a static normaliser keeps scaled fp16 gradients in range
    scale = state.loss_scale.scale

    def scaled_loss(params, mb):
        total, tokens = loss_sum(params, state.graphdef, mb, state.frozen)
        return total / denom * scale, (total, tokens)

    def accumulate(carry, mb_and_index):
        grads, total, tokens = carry
        mb, i = mb_and_index
        key = None if state.frozen is None else jax.random.fold_in(jax.random.fold_in(
            jax.random.key(LORA_DROPOUT_SEED), state.step), i)
        with training_dropout(key):
            (_, (t, n)), g = jax.value_and_grad(scaled_loss, has_aux=True)(state.params, mb)
        return (jax.tree.map(jnp.add, grads, g), total + t, tokens + n), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (grads, total, tokens), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0), jnp.float32(0)),
                                             (batch, jnp.arange(accum)))
    tokens = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g * (denom / (scale * tokens)), grads)
    loss, grad_norm = total / tokens, optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = jnp.where(finite, 0, state.skipped + 1)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        loss_scale=state.loss_scale.update(finite), skipped=skipped,
        total_skipped=state.total_skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": current_learning_rate(state.opt_state),
               "tokens": tokens, "loss_scale": scale, "skipped": (~finite).astype(jnp.int32),
               "consecutive_skips": skipped}
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(summed loss, target token count) of a [batch, seq] evaluation batch: a validation loss is the sum over
    its batches divided by the total count, the mean over every target token."""
    return loss_sum(state.params, state.graphdef, batch, state.frozen)


def jit_steps(mesh: Mesh, shardings: TrainState, rules: dict | None = None):
    """(train_step, eval_step) jitted for `mesh`: explicit in/out shardings, the state donated, and activations
    constrained through `rules` (the parameter rules of the sharding strategy)."""

    def train(state, batch):
        with activation_sharding(mesh, rules):
            return train_step(state, batch)

    def evaluate(state, batch):
        with activation_sharding(mesh, rules):
            return eval_step(state, batch)

    train_fn = jax.jit(train, in_shardings=(shardings, batch_sharding(mesh, leading_dims=1)),
                       out_shardings=(shardings, None), donate_argnums=0)
    eval_fn = jax.jit(evaluate, in_shardings=(shardings, batch_sharding(mesh)))
    return train_fn, eval_fn
