"""LoRA (phi_jax/lora.py): exact at initialisation, only adapters trained, merging, sharding, resuming."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_train_step import synthetic_batch

from phi_jax.config import Compute, PhiConfig
from phi_jax.lora import LoraConfig, is_adapter_path, merge_lora
from phi_jax.model import from_params, init_model, stacked_params
from phi_jax.optim import make_optimizer
from phi_jax.sharding import make_mesh
from phi_jax.train_step import train_step
from phi_jax.trainer import build_trainer

CFG = PhiConfig.preset("tiny")
IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 96))


def base_of(model):
    """The model without its adapters: the same base parameters in a plain model of the same layout."""
    params = {p: v for p, v in stacked_params(model).items() if not is_adapter_path(p)}
    return from_params(model.cfg, model.compute, params, scan_layers=model.scan_layers)


def randomize_adapters(model, seed: int = 1, scale: float = 0.05):
    """Non-zero B matrices (a fresh adapter's are zero), so that an update really flows."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        var.set_value(jax.numpy.asarray(rng.normal(0, scale, var.shape), var.dtype))
    return model


@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["stacked", "unrolled"])
def test_a_fresh_adapter_gives_exactly_the_base_logits(scan_layers):
    model = init_model(CFG, seed=3, lora=LoraConfig(rank=4), scan_layers=scan_layers)
    lora_logits = np.asarray(model(IDS)[0])
    np.testing.assert_array_equal(lora_logits, np.asarray(base_of(model)(IDS)[0]))
    randomize_adapters(model)
    assert np.abs(np.asarray(model(IDS)[0]) - lora_logits).max() > 1e-2  # the adapters are in the forward pass


@pytest.mark.parametrize("targets", ["qkv,dense,fc1,fc2", pytest.param("qkv,fc2", marks=pytest.mark.slow)])
def test_merged_and_unmerged_forwards_agree(targets):
    model = randomize_adapters(init_model(CFG, seed=3, lora=LoraConfig(rank=4, alpha=8.0, targets=targets)))
    merged = merge_lora(model)
    assert not any(is_adapter_path(p) for p in stacked_params(merged))
    np.testing.assert_allclose(np.asarray(merged(IDS)[0]), np.asarray(model(IDS)[0]), atol=1e-5, rtol=0)
    # the scaling is alpha / rank: merging with another alpha would not agree
    unscaled = merge_lora(randomize_adapters(init_model(CFG, seed=3, lora=LoraConfig(rank=4, alpha=4.0,
                                                                                      targets=targets))))
    assert np.abs(np.asarray(unscaled(IDS)[0]) - np.asarray(model(IDS)[0])).max() > 1e-3


def test_only_adapters_train_and_the_base_stays_bitwise():
    lora = LoraConfig(rank=4, dropout=0.1, base_dtype="bfloat16")
    trainer = build_trainer(CFG, Compute(), make_optimizer(1e-2), make_mesh(devices=jax.devices()[:1]), lora=lora)
    state = trainer.init_state(seed=0)
    # the optimizer state covers the adapters only: its moments are shaped like them
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sorted(x.shape for x in moments) == sorted(2 * [x.shape for x in jax.tree.leaves(state.params)])
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
    assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {np.dtype(jax.numpy.bfloat16)}
    base = jax.tree.map(np.asarray, state.frozen)
    adapters = jax.tree.map(np.asarray, state.params)
    step = jax.jit(train_step)
    losses = []
    for i in range(4):
        state, m = step(state, synthetic_batch(8, 2, seed=i))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(state.frozen), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    moved = [np.abs(a - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(state.params),
                                                             strict=True)]
    assert min(moved) > 1e-4, moved  # every adapter matrix (A and B of each target) moved


def test_adapters_and_base_shard_over_fsdp_and_tensor():
    mesh = make_mesh(1, 4, 2, devices=jax.devices()[:8])
    trainer = build_trainer(PhiConfig.preset("tiny"), Compute(), make_optimizer(1e-3), mesh,
                            lora=LoraConfig(rank=4))
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(trainer.shardings.params)}
    assert specs["['layers']['attn']['qkv']['lora']['lora_a']"] == P(None, "fsdp", None)
    assert specs["['layers']['mlp']['fc1']['lora']['lora_b']"] == P(None, None, "tensor")
    assert specs["['layers']['attn']['dense']['lora']['lora_a']"] == P(None, None, None)
    frozen = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(trainer.shardings.frozen)}
    assert frozen["['layers']['mlp']['fc1']['kernel']"] == P(None, "fsdp", "tensor")
    state = trainer.init_state(seed=0)  # created in those shardings
    assert state.params["layers"]["attn"]["qkv"]["lora"]["lora_a"].sharding.spec == P(None, "fsdp", None)
    assert state.frozen["layers"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")


@pytest.mark.slow
def test_a_sharded_lora_step_matches_the_single_device_step():
    """The same LoRA step on a (data 1, fsdp 4, tensor 2) mesh and on one device: equal loss and adapters."""
    results = []
    for mesh in (make_mesh(1, 4, 2, devices=jax.devices()[:8]), make_mesh(devices=jax.devices()[:1])):
        trainer = build_trainer(CFG, Compute(), make_optimizer(1e-2), mesh, lora=LoraConfig(rank=4))
        batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in synthetic_batch(8, 1).items()}
        state, m = trainer.train_step(trainer.init_state(seed=0), batch)
        results.append((float(m["loss"]), jax.tree.map(np.asarray, state.params)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_phi15_lora_config_trains_12_6m_adapters_on_a_frozen_bf16_base():
    """configs/phi15_lora.py at full size, abstractly: its checks pass, the optimizer holds the adapters only."""
    from configs.phi15_lora import get_config
    from phi_jax import validate
    from phi_jax.lora import from_run_config
    from phi_jax.run_config import compute_options

    c = get_config()
    validate.check_values(c)
    lora = from_run_config(c)
    assert (lora.rank, lora.alpha, lora.targets, lora.base_dtype) == (16, 32.0, ("qkv", "dense", "fc1", "fc2"),
                                                                      np.dtype(jax.numpy.bfloat16))
    cfg = PhiConfig.preset(c.model)
    trainer = build_trainer(cfg, compute_options(c), make_optimizer(c.learning_rate),
                            make_mesh(devices=jax.devices()[:1]), lora=lora)
    state = trainer.abstract_state
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    d, f = cfg.hidden_size, cfg.intermediate_size
    assert count(state.params) == cfg.num_layers * 16 * ((d + 3 * d) + 2 * d + 2 * (d + f)) == 12_582_912
    assert count(state.frozen) == cfg.num_params() == 1_418_270_720
    assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {np.dtype(jax.numpy.bfloat16)}
    assert count(state.opt_state) < 2 * count(state.params) + 10
    assert not hasattr(trainer.checkpoint_target, "frozen")


def test_the_fused_pallas_dense_adds_the_update_before_the_activation():
    """dense_impl=pallas runs the base matmul in the fused kernel and the adapter's update before gelu_new, as XLA."""
    from phi_jax.layers import Dense

    lora = LoraConfig(rank=4, alpha=8.0)
    outs = []
    for impl in ("xla", "pallas"):
        dense = Dense((64,), (128,), in_names=("embed",), out_names=("mlp",), activation="gelu_new", impl=impl,
                      lora=lora, lora_target="fc1", rngs=nnx.Rngs(params=0))
        randomize_adapters(dense)
        outs.append(np.asarray(dense(np.random.default_rng(0).normal(size=(2, 16, 64)).astype(np.float32))))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5)
