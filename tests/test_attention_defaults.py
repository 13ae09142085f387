"""The attention/dense defaults per platform and dtype, splash attention against XLA attention (interpret mode),
and the cuDNN path's wiring (lowered for CUDA from this CPU host)."""

from __future__ import annotations

import logging
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from phi_jax import dispatch
from phi_jax.attention import attention
from phi_jax.config import Compute, PhiConfig
from phi_jax.dispatch import resolve_attention_impl, resolve_dense_impl
from phi_jax.sharding import activation_sharding, make_mesh


# ------------------------------------------------------------------------------------------------- resolution
@pytest.mark.parametrize(("platform", "dtype", "expected"), [
    ("tpu", jnp.bfloat16, "splash"), ("tpu", jnp.float32, "splash"), ("tpu", jnp.float16, "splash"),
    ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float16, "cudnn"), ("gpu", jnp.float32, "xla"),
    ("cpu", jnp.bfloat16, "xla"), ("cpu", jnp.float32, "xla"),
])
def test_auto_attention_resolution(platform, dtype, expected):
    assert resolve_attention_impl("auto", dtype, platform) == expected


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_auto_dense_is_xla_everywhere(platform):
    assert resolve_dense_impl("auto", platform) == "xla"
    assert resolve_dense_impl("pallas", platform) == "pallas"
    with pytest.raises(ValueError, match=r"dense_impl='fused' is not one of \('auto', 'xla', 'pallas'\)"):
        resolve_dense_impl("fused", platform)


@pytest.mark.parametrize(("impl", "platform", "dtype", "match"), [
    ("cudnn", "cpu", jnp.bfloat16, "cannot run on 'cpu'"),
    ("cudnn", "tpu", jnp.bfloat16, "cannot run on 'tpu'"),
    ("cudnn", "gpu", jnp.float32, "needs bfloat16 or float16"),
    ("splash", "gpu", jnp.bfloat16, "cannot run on 'gpu'"),
    ("flash", "cpu", jnp.float32, "is not one of"),
])
def test_impossible_choices_raise(impl, platform, dtype, match):
    with pytest.raises(ValueError, match=match):
        resolve_attention_impl(impl, dtype, platform)


def test_config_accepts_splash():
    assert Compute(attention_impl="splash").attention_impl == "splash"


def test_resolution_is_logged(caplog):
    dispatch._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="phi_jax"):
        resolve_attention_impl("auto", jnp.bfloat16, "tpu")
    assert "attention: splash (asked for 'auto', bfloat16 on 'tpu')" in caplog.text


def test_compute_is_resolved_once_for_the_mesh_platform():
    """A model resolves `auto` when it is made: for JAX's default backend, or for the mesh a trainer is built for
    (the platform of its devices; a TPU topology's devices resolve for TPU, tests/test_compile_tpu.py)."""
    from phi_jax.model import init_model
    from phi_jax.optim import make_optimizer
    from phi_jax.trainer import build_trainer

    assert dispatch.mesh_platform(types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="cuda")]))
                                  ) == "gpu"
    model = init_model(PhiConfig.preset("tiny"))
    assert model.compute == Compute(attention_impl="xla", dense_impl="xla", platform="cpu")
    assert model.layers.attn.impl == "xla" and model.layers.attn.platform == "cpu"
    trainer = build_trainer(PhiConfig.preset("tiny"), Compute(dtype="bfloat16"), make_optimizer(1e-3),
                            make_mesh(devices=jax.devices()[:1]))
    assert trainer.compute.platform == "cpu" and trainer.compute.attention_impl == "xla"
    assert Compute().resolve("tpu").attention_impl == "splash"
    assert Compute(dtype="bfloat16").resolve("gpu").attention_impl == "cudnn"
    with pytest.raises(ValueError, match="resolved for 'tpu', not 'cpu'"):
        Compute().resolve("tpu").resolve("cpu")
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' cannot run on 'cpu'"):
        init_model(PhiConfig.preset("tiny"), compute=Compute(dtype="bfloat16", attention_impl="cudnn"))


# ------------------------------------------------------------------------------- splash vs XLA (interpret mode)
def _inputs(seq: int, head_dim: int, packed: bool, batch: int = 2, heads: int = 2, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seq + head_dim), 5)
    q, k, v, ct = (jax.random.normal(kk, (batch, seq, heads, head_dim), jnp.float32).astype(dtype)
                   for kk in keys[:4])
    seg = jnp.cumsum(jax.random.bernoulli(keys[4], 0.05, (batch, seq)), axis=1).astype(jnp.int32) if packed else None
    return q, k, v, ct, seg


def _out_and_grads(impl, q, k, v, ct, seg):
    def run(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segment_ids=seg, impl=impl), q, k, v)
        return out, vjp(ct)
    return jax.jit(run)(q, k, v)


@pytest.mark.parametrize(("seq", "head_dim", "packed"), [
    (256, 64, False),   # a block multiple
    (200, 64, True),    # odd length (padded to 256) with packed documents
    pytest.param(130, 128, True, marks=pytest.mark.slow),   # just past one 128-lane block
])
def test_splash_matches_xla_attention(seq, head_dim, packed):
    q, k, v, ct, seg = _inputs(seq, head_dim, packed)
    out, grads = _out_and_grads("splash", q, k, v, ct, seg)
    ref_out, ref_grads = _out_and_grads("xla", q, k, v, ct, seg)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=name)


def test_splash_bf16_matches_xla_attention():
    q, k, v, ct, seg = _inputs(200, 64, True, dtype=jnp.bfloat16)
    out, grads = _out_and_grads("splash", q, k, v, ct, seg)
    ref_out, ref_grads = _out_and_grads("xla", q, k, v, ct, seg)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True):
        assert got.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2,
                                   err_msg=name)


def test_splash_per_shard_on_a_mesh_matches_xla():
    """Under a (data 2, fsdp 2, tensor 2) mesh the kernel runs per shard through shard_map."""
    mesh = make_mesh(2, 2, 2)
    q, k, v, ct, seg = _inputs(128, 64, True, batch=4, heads=2)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    qkv = PartitionSpec(("data", "fsdp"), None, "tensor", None)
    q, k, v, ct = (put(x, qkv) for x in (q, k, v, ct))
    seg = put(seg, PartitionSpec(("data", "fsdp"), None))
    with activation_sharding(mesh):
        out, grads = _out_and_grads("splash", q, k, v, ct, seg)
    ref_out, ref_grads = _out_and_grads("xla", q, k, v, ct, seg)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=name)


def test_phi_model_with_splash_matches_xla():
    """phi's own shapes: head_dim 64 with partial rotary (32 of 64), packed documents, an odd length."""
    from flax import nnx

    from phi_jax.model import Phi

    cfg = PhiConfig.preset("tiny", hidden_size=128, num_heads=2, rotary_dim=32, num_layers=1,
                           initializer_range=0.2)  # large enough weights that attention is far from uniform
    tokens = jax.random.randint(jax.random.key(1), (2, 100), 0, cfg.vocab_size)
    seg = jnp.concatenate([jnp.ones((2, 40), jnp.int32), 2 * jnp.ones((2, 60), jnp.int32)], axis=1)
    pos = jnp.concatenate([jnp.arange(40), jnp.arange(60)])[None].repeat(2, 0)

    def loss_and_grads(impl):
        model = Phi(cfg, Compute(attention_impl=impl), rngs=nnx.Rngs(params=0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params):
            logits, _ = nnx.merge(graphdef, params)(tokens, positions=pos, segment_ids=seg)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1))
        return jax.jit(jax.value_and_grad(loss))(params)

    (loss, grads), (ref_loss, ref_grads) = loss_and_grads("splash"), loss_and_grads("xla")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-4)


def test_splash_bad_shapes_raise():
    from phi_jax.kernels.splash_attention import splash_attention

    x = jnp.zeros((1, 16, 2, 64))
    with pytest.raises(ValueError, match="one shape"):
        splash_attention(x, jnp.zeros((1, 8, 2, 64)), x)
    with pytest.raises(ValueError, match="segment_ids"):
        splash_attention(x, x, x, jnp.zeros((1, 15), jnp.int32))


# --------------------------------------------------------------------------------- cuDNN wiring (lowered for CUDA)
@pytest.mark.parametrize("packed", [False, True])
def test_auto_on_gpu_lowers_to_cudnn_fused_attention(monkeypatch, packed):
    """`auto` with bf16 on a GPU lowers, forward and backward, to cuDNN's fused-attention custom calls with the
    causal mask (and the segment mask as a bias). No GPU here: the platform is named 'gpu' and jaxlib's cuDNN
    version query (absent without the CUDA plugin) answers 9.10; the lowering itself is JAX's real one."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "cuda_versions",
                        types.SimpleNamespace(cudnn_get_version=lambda: 91000))
    x = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 256), jnp.int32) if packed else None

    def loss(q, k, v, seg):
        return jnp.sum(attention(q, k, v, segment_ids=seg, impl="auto", platform="gpu").astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x, seg).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @(__cudnn\$fmha\w+)", text)
    kind = "ScaleBiasSoftmax" if packed else "Softmax"
    assert calls == [f"__cudnn$fmha{kind}", f"__cudnn$fmha{kind}Backward"], calls
    assert text.count("mask_type\\22: \\22CAUSAL") == 2

    # float32 on a GPU resolves to XLA: no cuDNN call at all.
    x32 = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.float32)
    text32 = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x32, x32, x32, seg).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "__cudnn$fmha" not in text32


# ------------------------------------------------------------------------ Pallas lowering and interpret mode
@pytest.mark.parametrize(("platform", "backend", "interpret", "expected"), [
    ("cpu", None, None, ("gpu", True)),    # on CPU: the GPU-style kernel, interpreted
    ("cpu", "tpu", None, ("tpu", True)),
    ("gpu", None, None, ("gpu", False)),
    ("tpu", None, None, ("tpu", False)),
    ("gpu", "tpu", True, ("tpu", True)),
])
def test_pallas_target(platform, backend, interpret, expected):
    assert dispatch.pallas_target(platform, backend, interpret) == expected


@pytest.mark.parametrize(("platform", "backend", "interpret", "match"), [
    ("cpu", None, False, "interpret=False needs a GPU, but this computation runs on 'cpu'"),
    ("cuda", None, None, "platform='cuda' is not one of"),
    ("gpu", "tpu", None, "needs a TPU, but this computation runs on 'gpu'"),
    ("tpu", "cuda", None, "backend='cuda' is not a Pallas lowering"),
])
def test_pallas_target_errors(platform, backend, interpret, match):
    with pytest.raises(ValueError, match=match):
        dispatch.pallas_target(platform, backend, interpret)


@pytest.mark.parametrize("kernel", ["flash_attention", "splash_attention", "fused_dense"])
def test_pallas_kernels_follow_the_named_platform(kernel):
    """Every Pallas entry point lowers for the platform it is given, and jit's cache sees it (a static argument):
    from this CPU host, `platform="tpu"` (as when compiling ahead of time for a TPU topology) lowers to a compiled
    Mosaic kernel; the default (JAX's backend, CPU here) runs in interpret mode (no Mosaic custom call)."""
    from phi_jax.kernels.dense import fused_dense
    from phi_jax.kernels.flash_attention import flash_attention
    from phi_jax.kernels.splash_attention import splash_attention

    x = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.float32)
    args = {"fused_dense": (jax.ShapeDtypeStruct((16, 128), jnp.float32), jax.ShapeDtypeStruct((128, 128), jnp.float32),
                            jax.ShapeDtypeStruct((128,), jnp.float32))}.get(kernel, (x, x, x))
    fn = {"fused_dense": fused_dense, "flash_attention": flash_attention, "splash_attention": splash_attention}[kernel]
    lowered = jax.jit(fn, static_argnames="platform")
    assert "tpu_custom_call" in lowered.trace(*args, platform="tpu").lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" not in lowered.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
