"""The pure train step: learning, exact gradient accumulation, non-finite skipping and fp16 loss scaling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from phi_jax.config import Compute, PhiConfig
from phi_jax.optim import make_optimizer
from phi_jax.sharding import make_mesh
from phi_jax.train_step import train_step
from phi_jax.trainer import build_trainer

SEQ = 32


def synthetic_batch(rows: int, accum: int, seed: int = 0, vocab: int = 64) -> dict[str, np.ndarray]:
    """Sequences of a noisy counting pattern: learnable, so the loss must fall."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab, (rows, 1))
    tokens = ((start + np.arange(SEQ + 1)) % vocab).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (rows, SEQ)).copy(),
             "segment_ids": np.ones((rows, SEQ), np.int32), "loss_mask": np.ones((rows, SEQ), np.float32)}
    return {k: v.reshape(accum, rows // accum, *v.shape[1:]) for k, v in batch.items()}


def new_state(cfg=None, lr=3e-3, compute=Compute(), **kw):
    cfg = cfg or PhiConfig.preset("tiny")
    return build_trainer(cfg, compute, make_optimizer(lr, **kw), make_mesh(devices=jax.devices()[:1])).init_state()


step_fn = jax.jit(train_step)


def test_loss_falls():
    state = new_state()
    losses = []
    for i in range(40):
        state, m = step_fn(state, synthetic_batch(8, 1, seed=i))
        losses.append(float(m["loss"]))
    assert losses[0] > 5.0 and losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 40


def test_accumulation_equals_one_large_batch():
    """Plain SGD with lr 1 makes the update the gradient itself, so the comparison is of gradients (Adam's first
    step is ~lr*sign(g) and would amplify rounding in near-zero gradients)."""
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    cfg = PhiConfig.preset("tiny")
    results = []
    for accum in (1, 4):
        state = build_trainer(cfg, Compute(), sgd, make_mesh(devices=jax.devices()[:1])).init_state()
        before = state.params
        after, metrics = step_fn(state, synthetic_batch(8, accum))
        grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), before, after.params)
        results.append((metrics, grads))
    (m1, g1), (m4, g4) = results
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(g1)) > 1e-3  # the gradients are not trivially zero


def test_masked_tokens_do_not_count():
    state = new_state()
    batch = synthetic_batch(8, 1)
    batch["loss_mask"][..., SEQ // 2:] = 0.0
    _, m = step_fn(state, batch)
    assert float(m["tokens"]) == 8 * SEQ // 2


def test_non_finite_batch_skips_the_update():
    state = new_state()
    params_before = jax.tree.map(np.asarray, state.params)
    batch = synthetic_batch(8, 1)
    batch["loss_mask"][0, 0, 0] = np.nan  # a NaN reaches the loss
    state, m = step_fn(state, batch)
    assert int(m["skipped"]) == 1 and int(state.skipped) == 1 and int(state.total_skipped) == 1
    for a, b in zip(jax.tree.leaves(params_before), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    state, m = step_fn(state, synthetic_batch(8, 1))
    assert int(m["skipped"]) == 0 and int(state.skipped) == 0 and int(state.total_skipped) == 1


def test_fp16_overflow_halves_the_loss_scale_and_skips():
    state = new_state(compute=Compute(dtype="float16"))
    state = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(3e38)))  # forces fp16 overflow
    params_before = jax.tree.map(np.asarray, state.params)
    state, m = step_fn(state, synthetic_batch(8, 1))
    assert int(m["skipped"]) == 1
    assert float(state.loss_scale.scale) == pytest.approx(1.5e38)
    for a, b in zip(jax.tree.leaves(params_before), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    state = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(2.0**10)))
    state, m = step_fn(state, synthetic_batch(8, 1))
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"]))


def test_loss_scale_grows_after_a_run_of_good_steps():
    from phi_jax.optim import LossScale

    scale = LossScale.create(dynamic=True, initial_scale=8.0, period=3)
    for _ in range(3):
        scale = scale.update(jnp.bool_(True))
    assert float(scale.scale) == 16.0 and int(scale.good_steps) == 0
    assert float(scale.update(jnp.bool_(False)).scale) == 8.0


def test_weight_decay_skips_biases_and_norms():
    """One real step with and without weight decay: AdamW's decoupled decay moves each decayed parameter by exactly
    -lr * wd * p and leaves biases and norms where the gradient alone puts them."""
    from phi_jax.optim import decay_mask

    lr, wd = 1e-2, 0.5
    before = new_state(lr=lr, weight_decay=wd)
    mask = decay_mask(before.params)
    assert mask["layers"]["mlp"]["fc1"]["kernel"] and mask["embed_tokens"]
    assert not mask["layers"]["mlp"]["fc1"]["bias"] and not mask["final_layernorm"]["scale"]
    p0 = jax.tree.map(np.asarray, before.params)
    decayed, _ = step_fn(before, synthetic_batch(8, 1))
    plain, _ = step_fn(new_state(lr=lr, weight_decay=0.0), synthetic_batch(8, 1))
    get = lambda tree, path: np.asarray(functools.reduce(lambda t, k: t[k.key], path, tree))
    for path, m in jax.tree_util.tree_leaves_with_path(mask):
        delta = get(decayed.params, path) - get(plain.params, path)
        expected = -lr * wd * get(p0, path) if m else np.zeros_like(delta)
        np.testing.assert_allclose(delta, expected, atol=1e-7, err_msg=jax.tree_util.keystr(path))
        assert not m or np.abs(expected).max() > 100 * 1e-7  # the decay is far above the tolerance
