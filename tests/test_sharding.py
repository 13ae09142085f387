"""Sharded training on 8 fake CPU devices equals training on one device, for every strategy and several meshes."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from phi_jax.checkpoint import Checkpointer
from phi_jax.config import Compute, PhiConfig
from phi_jax.optim import make_optimizer
from phi_jax.sharding import logical_to_spec, make_mesh, strategy_rules
from phi_jax.trainer import build_trainer

SEQ, ROWS, STEPS = 32, 16, 3
CFG = PhiConfig.preset("tiny")
TX = make_optimizer(1e-3)  # one instance: the state's static fields must compare equal across restores


def batches(steps: int, accum: int = 1, vocab: int = CFG.vocab_size):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        start = rng.integers(0, vocab, (ROWS, 1))
        noise = rng.integers(0, 3, (ROWS, SEQ + 1))
        tokens = ((start + np.arange(SEQ + 1) + noise) % vocab).astype(np.int32)
        b = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ROWS, SEQ)).copy(),
             "segment_ids": np.ones((ROWS, SEQ), np.int32), "loss_mask": np.ones((ROWS, SEQ), np.float32)}
        out.append({k: v.reshape(accum, ROWS // accum, SEQ) for k, v in b.items()})
    return out


def run(mesh, strategy: str, steps=STEPS, state=None, data=None):
    trainer = build_trainer(CFG, Compute(), TX, mesh, strategy)
    if state is None:
        state = trainer.init_state(seed=0)
    step_fn = trainer.train_step
    losses, grad_norms = [], []
    for b in data or batches(steps):
        state, m = step_fn(state, b)
        losses.append(float(m["loss"]))
        grad_norms.append(float(m["grad_norm"]))
    return state, losses, grad_norms


@pytest.fixture(scope="module")
def reference():
    state, losses, grad_norms = run(make_mesh(devices=jax.devices()[:1]), "dp")
    return jax.tree.map(np.asarray, state.params), losses, grad_norms


# Every strategy with and without tensor parallelism runs by default; the other combinations are marked slow.
slow = pytest.mark.slow
CASES = [("dp", (8, 1, 1), ()), ("dp", (2, 2, 2), (slow,)), ("zero1", (8, 1, 1), (slow,)), ("zero1", (2, 4, 1), ()),
         ("zero1", (1, 4, 2), (slow,)), ("fsdp", (8, 1, 1), (slow,)), ("fsdp", (2, 4, 1), (slow,)),
         ("fsdp", (2, 2, 2), ()), ("fsdp", (1, 4, 2), ())]


@pytest.mark.parametrize("strategy,shape", [pytest.param(s, m, marks=k, id=f"{s}-{'x'.join(map(str, m))}")
                                            for s, m, k in CASES])
def test_sharded_training_matches_one_device(reference, strategy, shape):
    """Losses, parameters and gradient norms. Adam's update is ~lr*sign(g): blind to a gradient's scale (a sum
    where a mean belongs, a missing 1/devices), so the gradient norms, which are not, are compared too."""
    ref_params, ref_losses, ref_grad_norms = reference
    state, losses, grad_norms = run(make_mesh(*shape), strategy)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    np.testing.assert_allclose(grad_norms, ref_grad_norms, rtol=2e-5)
    assert losses[-1] < losses[0]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_params), jax.tree.leaves(state.params),
                            strict=True):
        np.testing.assert_allclose(np.asarray(b), a, atol=3e-5, err_msg=jax.tree_util.keystr(path))


def test_parameter_and_moment_shardings_follow_the_strategy():
    mesh = make_mesh(2, 2, 2)
    expected_qkv = {  # [layers, embed, 3, heads, head_dim]
        "dp": (P(None, None, None, "tensor", None), P(None, None, None, "tensor", None)),
        "zero1": (P(None, None, None, "tensor", None), P(None, ("data", "fsdp"), None, "tensor", None)),
        "fsdp": (P(None, "fsdp", None, "tensor", None), P(None, "fsdp", None, "tensor", None)),
    }
    for strategy, (param_spec, moment_spec) in expected_qkv.items():
        state = build_trainer(CFG, Compute(), TX, mesh, strategy).init_state()
        qkv = state.params["layers"]["attn"]["qkv"]["kernel"]
        assert qkv.sharding.spec == param_spec, strategy
        mu = state.opt_state.inner_state[0].mu["layers"]["attn"]["qkv"]["kernel"]
        assert mu.sharding.spec == moment_spec, strategy
        # each device holds only its shard: never the whole parameter on one host
        assert qkv.addressable_shards[0].data.size == qkv.size // (4 if strategy == "fsdp" else 2)
        emb = state.params["embed_tokens"]  # [vocab, embed]
        assert emb.sharding.spec == (P("tensor", "fsdp") if strategy == "fsdp" else P("tensor", None))


def test_unknown_logical_name_is_an_error():
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("embed", "experts"))
    with pytest.raises(ValueError, match="not one of"):
        strategy_rules("zero3")


def test_mesh_sizes_are_checked():
    assert dict(make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh(3, 2, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        make_mesh(-1, -1, 1)


def test_checkpoint_from_8_devices_restores_onto_4(tmp_path, reference):
    """Save after 2 steps on a 2x2x2 FSDP mesh, restore on a 4-device mesh, take the 3rd step there."""
    _, ref_losses, _ = reference
    data = batches(STEPS)
    mesh8 = make_mesh(2, 2, 2)
    state, first, _ = run(mesh8, "fsdp", data=data[:2])
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(2, state, {"model": CFG.to_dict()})
    ckpt.close()

    mesh4 = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    restored = Checkpointer(tmp_path).restore(2, build_trainer(CFG, Compute(), TX, mesh4, "fsdp").abstract_state)
    assert restored.params["layers"]["attn"]["qkv"]["kernel"].sharding.mesh.devices.size == 4
    _, last, _ = run(mesh4, "fsdp", state=restored, data=data[2:])
    np.testing.assert_allclose(first + last, ref_losses, rtol=2e-5)
