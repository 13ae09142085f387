"""The whole model on phi_jax's Pallas kernels (interpret mode on CPU) equals the XLA path: logits, gradients and
a few training steps."""

import jax
import numpy as np
from flax import nnx

from phi_jax.config import Compute, PhiConfig
from phi_jax.model import Phi
from phi_jax.optim import make_optimizer
from phi_jax.sharding import make_mesh
from phi_jax.train_step import loss_sum, train_step
from phi_jax.trainer import build_trainer

SEQ, ROWS = 48, 2  # 48 is not a multiple of the kernels' blocks: padding is exercised too


def batch(accum: int = 1, seed: int = 0, vocab: int = 512):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (ROWS, SEQ + 1)).astype(np.int32)
    segments = np.where(np.arange(SEQ) < 20, 1, 2).astype(np.int32)  # two packed documents per row
    positions = np.where(segments == 1, np.arange(SEQ), np.arange(SEQ) - 20).astype(np.int32)
    b = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.tile(segments, (ROWS, 1)),
         "positions": np.tile(positions, (ROWS, 1)), "loss_mask": np.ones((ROWS, SEQ), np.float32)}
    return {k: v.reshape(accum, ROWS // accum, SEQ) for k, v in b.items()}


def compute(impl: str) -> Compute:
    return Compute(attention_impl=impl, dense_impl=impl)


def test_logits_and_gradients_match_xla():
    b = {k: v[0] for k, v in batch().items()}
    results = {}
    for impl in ("xla", "pallas"):
        graphdef, params = nnx.split(Phi(PhiConfig.preset("tiny"), compute(impl), rngs=nnx.Rngs(params=0)), nnx.Param)
        params = nnx.to_pure_dict(params)
        logits, _ = nnx.merge(graphdef, params)(b["inputs"], b["positions"], segment_ids=b["segment_ids"])
        grads = jax.grad(lambda p, g=graphdef: loss_sum(p, g, b)[0])(params)
        results[impl] = (np.asarray(logits), jax.tree.map(np.asarray, grads))
    (ref_logits, ref_grads), (logits, grads) = results["xla"], results["pallas"]
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)
    for (path, r), g in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads), strict=True):
        scale = float(np.abs(r).max()) + 1e-12
        np.testing.assert_allclose(g / scale, r / scale, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_training_with_both_kernels_matches_xla():
    losses = {}
    mesh = make_mesh(devices=jax.devices()[:1])
    for impl in ("xla", "pallas"):
        state = build_trainer(PhiConfig.preset("tiny"), compute(impl), make_optimizer(3e-3), mesh).init_state()
        step = jax.jit(train_step)
        losses[impl] = []
        for _ in range(3):
            state, m = step(state, batch())  # the same batch: memorising it must lower the loss
            losses[impl].append(float(m["loss"]))
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-4)
    assert losses["pallas"][-1] < losses["pallas"][0]
