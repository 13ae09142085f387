"""The model on its own: full-size shapes without memory, packing, the KV cache, dtypes and remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi_jax.config import PRESETS, Compute, PhiConfig
from phi_jax.model import abstract_model, count_params, init_model, to_layout


def test_full_phi15_shapes_without_memory():
    model = abstract_model(PhiConfig.preset("phi-1.5"))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert count_params(model) == 1_418_270_720 == PhiConfig().num_params()
    assert model.layers.attn.qkv.kernel.shape == (24, 2048, 3, 32, 64)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_formula_matches_tree(name):
    cfg = PhiConfig.preset(name)
    assert count_params(abstract_model(cfg)) == cfg.num_params()


@pytest.mark.parametrize("bad, match", [
    (dict(hidden_size=100, num_heads=3), "not divisible by num_heads"),
    (dict(rotary_dim=31), "rotary_dim=31 must be even"),
    (dict(rotary_dim=128), "at most head_dim=64"),
    (dict(num_layers=0), "num_layers=0 must be positive"),
])
def test_invalid_config(bad, match):
    with pytest.raises(ValueError, match=match):
        PhiConfig(**bad)


@pytest.mark.parametrize("bad, match", [
    (dict(dtype="float8"), "Compute.dtype='float8' is not one of"),
    (dict(param_dtype="float64"), "Compute.param_dtype='float64' is not one of"),
    (dict(param_dtype=jnp.int8), "Compute.param_dtype=.*int8.* is not one of"),
    (dict(attention_impl="flash"), "Compute.attention_impl='flash' is not one of"),
    (dict(dense_impl="cuda"), "Compute.dense_impl='cuda' is not one of"),
    (dict(remat="some"), "Compute.remat='some' is not one of"),
    (dict(platform="cuda"), "Compute.platform='cuda' is not one of"),
])
def test_invalid_compute(bad, match):
    with pytest.raises(ValueError, match=match):
        Compute(**bad)


def test_compute_holds_jnp_dtypes_and_names_them():
    c = Compute(dtype="bfloat16", param_dtype=jnp.float16)
    assert c.dtype == jnp.bfloat16 and c.param_dtype == jnp.float16 and isinstance(c.dtype, jnp.dtype)
    assert c == Compute(dtype=jnp.bfloat16, param_dtype="float16")  # one value whichever way it was written
    assert c.to_dict() == {"dtype": "bfloat16", "param_dtype": "float16", "attention_impl": "auto",
                           "dense_impl": "auto", "remat": "none", "platform": None, "attention_fallback": None}
    assert Compute(**c.to_dict()) == c


def test_phi_config_is_the_architecture_only():
    """PhiConfig holds no compute field and reads back its own dict; an unknown key is an error (a compute field
    in a model config too); a model keeps both objects."""
    tiny = PhiConfig.preset("tiny")
    assert PhiConfig.from_dict(tiny.to_dict()) == tiny
    assert not {"dtype", "param_dtype", "attention_impl", "dense_impl", "remat"} & set(PhiConfig().to_dict())
    with pytest.raises(ValueError, match=r"Unknown PhiConfig fields \['n_layer', 'remat'\]"):
        PhiConfig.from_dict({**tiny.to_dict(), "n_layer": 2, "remat": "full"})
    assert PhiConfig.preset("tiny").diff(PhiConfig.preset("tiny", num_layers=3)) == ["num_layers: 2 vs 3"]
    # The special token ids and the init std are recorded but are not the architecture.
    other_ids = PhiConfig.preset("tiny", eos_token_id=7, bos_token_id=7, initializer_range=0.2)
    assert other_ids == PhiConfig.preset("tiny") and not other_ids.diff(PhiConfig.preset("tiny"))
    model = abstract_model(PhiConfig.preset("tiny"), Compute(param_dtype="bfloat16"))
    assert model.compute.param_dtype == jnp.bfloat16 and model.embed_tokens.dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def tiny():
    return init_model(PhiConfig.preset("tiny"), seed=1)


def test_packed_documents_equal_separate_runs(tiny):
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 512, 150), rng.integers(0, 512, 106)
    packed = np.concatenate([doc_a, doc_b])[None]
    segment_ids = np.array([[1] * 150 + [2] * 106])
    positions = np.concatenate([np.arange(150), np.arange(106)])[None]
    out = np.asarray(tiny(packed, positions, segment_ids=segment_ids)[0])
    np.testing.assert_allclose(out[0, :150], np.asarray(tiny(doc_a[None])[0])[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 150:], np.asarray(tiny(doc_b[None])[0])[0], atol=1e-5)
    # Without segment ids the second document sees the first: the logits must differ.
    assert not np.allclose(np.asarray(tiny(packed, positions)[0])[0, 150:], out[0, 150:], atol=1e-3)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_decode_matches_full_forward(scan_layers):
    """Prefill and single-token steps through the cache equal one full forward, in either layer layout (stacked,
    as trained, or one Block per layer, as decoded); the unrolled copy of a model computes the same logits."""
    stacked = init_model(PhiConfig.preset("tiny"), seed=1)
    ids = np.random.default_rng(1).integers(0, 512, (2, 40))
    full = np.asarray(stacked(ids)[0])
    model = to_layout(stacked, scan_layers=scan_layers)
    assert model.scan_layers is scan_layers
    np.testing.assert_allclose(np.asarray(model(ids)[0]), full, atol=2e-5)
    cache = model.init_cache(batch=2, max_len=64)
    prefill, cache = model(ids[:, :30], cache=cache)
    steps = [prefill]
    for t in range(30, 40):
        logits, cache = model(ids[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), full, atol=2e-5)
    assert int(cache.index) == 40
    # A prefill asked for one position per row (its last real token) gives that position's logits alone.
    at = np.array([29, 17], np.int32)
    last, _ = model(ids[:, :30], cache=model.init_cache(batch=2, max_len=64), logits_at=at)
    assert last.shape == (2, 1, model.cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(last)[:, 0], full[[0, 1], at], atol=2e-5)


def test_to_layout_is_a_new_model_and_round_trips_exactly():
    """Unrolling gives one Block per layer holding layer i of each stacked parameter; stacking back gives the
    stacked arrays bit for bit; the source model is never changed."""
    model = init_model(PhiConfig.preset("tiny"), seed=2)
    before = jax.tree.map(np.asarray, nnx.state(model))
    graphdef = nnx.graphdef(model)
    unrolled = to_layout(model, scan_layers=False)
    assert unrolled is not model and len(unrolled.layers) == model.cfg.num_layers
    np.testing.assert_array_equal(np.asarray(unrolled.layers[1].mlp.fc1.kernel[...]),
                                  np.asarray(model.layers.mlp.fc1.kernel[...])[1])
    assert unrolled.layers[1].mlp.fc1.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert model.layers.mlp.fc1.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    back = to_layout(unrolled, scan_layers=True)
    assert nnx.graphdef(back) == graphdef and to_layout(back, scan_layers=True) is back
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert nnx.graphdef(model) == graphdef
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_hidden_states_are_what_lm_head_reads():
    model = init_model(PhiConfig.preset("tiny"), seed=6)
    ids = np.random.default_rng(6).integers(0, 512, (2, 24))
    seg = np.array([[1] * 10 + [2] * 14] * 2)
    pos = np.concatenate([np.arange(10), np.arange(14)])[None].repeat(2, 0)
    h = model.hidden_states(ids, pos, segment_ids=seg)
    assert h.shape == (2, 24, model.cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(model.lm_head(h, out_dtype=jnp.float32)),
                               np.asarray(model(ids, pos, segment_ids=seg)[0]), atol=1e-6)
    # The final LayerNorm at initialisation (scale 1, bias 0): each row has mean 0 and variance v / (v + eps) for
    # its input's variance v (~2e-3 here), just under 1; the residual stream before it has v itself.
    np.testing.assert_allclose(np.asarray(h).mean(-1), 0, atol=1e-5)
    assert np.all((np.asarray(h).var(-1) > 0.98) & (np.asarray(h).var(-1) < 1.0))


def test_bfloat16_compute_keeps_float32_logits(monkeypatch):
    """At initializer_range 0.2 the logits are ~1.6 and attention is sharp enough that a rotary bug moves them by
    ~3.8, while bf16 rounding moves them by ~0.09: the tolerance sits between (at the default 0.02 a rotary bug
    moved them by 6e-3, below bf16's own error of 4e-3 and far below the old tolerance of 5e-2)."""
    import phi_jax.model as model_module

    cfg32 = PhiConfig.preset("tiny", initializer_range=0.2)
    ids = np.random.default_rng(2).integers(0, 512, (1, 64))
    bf16 = Compute(dtype="bfloat16")
    a, b = np.asarray(init_model(cfg32, seed=3)(ids)[0]), init_model(cfg32, seed=3, compute=bf16)(ids)[0]
    assert b.dtype == jnp.float32
    tolerance = 0.2
    np.testing.assert_allclose(np.asarray(b), a, atol=tolerance)
    monkeypatch.setattr(model_module, "apply_partial_rotary", lambda x, cos, sin: x)  # a rotary bug
    broken = np.asarray(init_model(cfg32, seed=3, compute=bf16)(ids)[0])
    assert np.abs(broken - a).max() > 5 * tolerance


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_changes_nothing_numerically(remat):
    ids = np.random.default_rng(3).integers(0, 512, (2, 32))

    def grads(compute):
        model = init_model(PhiConfig.preset("tiny"), seed=4, compute=compute)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            return nnx.merge(graphdef, p)(ids)[0].mean()

        return jax.grad(loss)(params)

    base, other = grads(Compute()), grads(Compute(remat=remat))
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(other), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_xla_attention_recomputing_backward_equals_autodiff():
    """The XLA path's custom backward (probabilities recomputed, FlashAttention-2's row sums) against jax.grad of
    the plain softmax formula, with two packed documents over 200 tokens."""
    from phi_jax.attention import attention, causal_segment_mask

    rng = np.random.default_rng(5)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal((2, 200, 3, 32)), jnp.float32) for _ in range(4))
    seg = jnp.asarray(np.repeat([[1, 2]], 100, axis=1).repeat(2, axis=0))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * d_out)

    ours = jax.value_and_grad(lambda *a: loss(lambda *b: attention(*b, segment_ids=seg, impl="xla"), *a),
                              argnums=(0, 1, 2))(q, k, v)
    mask = causal_segment_mask(seg, 200)[:, None]   # [B, 1, T, S]
    plain = lambda *b: jax.nn.dot_product_attention(*b, mask=mask, implementation="xla")   # JAX's own, autodiffed
    ref = jax.value_and_grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-4)  # a sum of 38,400 products
    for got, want in zip(ours[1], ref[1], strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
