"""The cuDNN decisions of phi_jax.dispatch, with the GPU faked (no GPU here): a compute capability below 8.0
resolves `auto` to XLA; a call cuDNN cannot train (packed rows at an odd length, an unsupported head size) runs
`auto`'s fallback (XLA) with a logged reason, or is a ValueError before compiling when cudnn was asked for; and
cudnn on a CPU is refused when the trainer is built, before any compile. The lowerings are JAX's real ones for CUDA
(as in tests/test_attention_defaults.py)."""

from __future__ import annotations

import logging
import re
import types

import jax
import jax.numpy as jnp
import pytest

from phi_jax import dispatch
from phi_jax.attention import attention
from phi_jax.config import Compute, PhiConfig


@pytest.fixture(autouse=True)
def _fresh_log():
    dispatch._LOGGED.clear()


@pytest.mark.parametrize(("capability", "dtype", "expected"), [
    ((9, 0), jnp.bfloat16, "cudnn"), ((8, 0), jnp.bfloat16, "cudnn"), ((8, 6), jnp.float16, "cudnn"),
    ((10, 0), jnp.bfloat16, "cudnn"), (None, jnp.bfloat16, "cudnn"),  # unknown (no GPU visible): cuDNN
    ((7, 5), jnp.bfloat16, "xla"), ((7, 0), jnp.float16, "xla"), ((6, 0), jnp.bfloat16, "xla"),
    ((9, 0), jnp.float32, "xla"),
])
def test_auto_on_gpu_by_compute_capability(capability, dtype, expected):
    assert dispatch.resolve_attention_impl("auto", dtype, "gpu", capability) == expected


def test_old_gpu_is_logged_with_the_reason(caplog):
    with caplog.at_level(logging.INFO, logger="phi_jax"):
        dispatch.resolve_attention_impl("auto", jnp.bfloat16, "gpu", (7, 5))
    assert ("attention: xla (asked for 'auto', bfloat16 on 'gpu'): compute capability 7.5 is below the 8.0 cuDNN "
            "flash attention needs") in caplog.text


def test_capability_defaults_to_the_default_gpus(monkeypatch):
    monkeypatch.setattr(dispatch, "gpu_capability", lambda: (7, 0))   # e.g. a V100 as JAX's default device
    assert dispatch.resolve_attention_impl("auto", jnp.bfloat16, "gpu") == "xla"
    with pytest.raises(ValueError, match=r"'cudnn' cannot run on this GPU: compute capability 7.0 is below"):
        dispatch.resolve_attention_impl("cudnn", jnp.bfloat16, "gpu")
    monkeypatch.setattr(dispatch, "gpu_capability", lambda: (9, 0))
    assert dispatch.resolve_attention_impl("auto", jnp.bfloat16, "gpu") == "cudnn"


def test_device_capability():
    assert dispatch.device_capability(types.SimpleNamespace(compute_capability="9.0")) == (9, 0)
    assert dispatch.device_capability(types.SimpleNamespace(compute_capability="12.1")) == (12, 1)
    assert dispatch.device_capability(types.SimpleNamespace(platform="tpu")) is None
    assert dispatch.device_capability(jax.devices()[0]) is None  # this host's CPU


def test_compute_keeps_autos_fallback_and_an_explicit_cudnn_has_none():
    auto = Compute(dtype="bfloat16").resolve("gpu", (9, 0))
    assert (auto.attention_impl, auto.attention_fallback) == ("cudnn", "xla")
    assert auto.resolve("gpu", (9, 0)) == auto                      # resolving again changes nothing
    explicit = Compute(dtype="bfloat16", attention_impl="cudnn").resolve("gpu", (9, 0))
    assert (explicit.attention_impl, explicit.attention_fallback) == ("cudnn", None)
    old = Compute(dtype="bfloat16").resolve("gpu", (7, 5))
    assert (old.attention_impl, old.attention_fallback) == ("xla", None)
    assert Compute(dtype="bfloat16").resolve("tpu").attention_fallback is None
    assert Compute(**auto.to_dict()) == auto
    with pytest.raises(ValueError, match="attention_fallback='flash' is not one of"):
        Compute(attention_fallback="flash")


@pytest.mark.parametrize(("seq", "head_dim", "packed", "capability", "why"), [
    (2048, 64, True, (9, 0), ""), (2048, 64, False, (8, 0), ""), (2047, 64, False, (8, 0), ""),
    (2047, 64, True, (9, 0), "S=2047"), (101, 64, True, (8, 0), "S=101"),
    (2048, 60, False, (9, 0), "head_dim=60"), (2048, 256, False, (9, 0), ""),
    (2048, 256, False, (8, 0), "up to 128"), (2048, 264, False, (9, 0), "up to 256"),
])
def test_cudnn_unsupported(seq, head_dim, packed, capability, why):
    got = dispatch.cudnn_unsupported(seq, head_dim, packed, capability)
    assert (why in got and got) if why else got == ""


def test_call_falls_back_for_auto_and_raises_for_explicit_cudnn(caplog):
    with caplog.at_level(logging.INFO, logger="phi_jax"):
        assert dispatch.attention_for_call("cudnn", "xla", 2047, 64, True, (9, 0)) == "xla"
    assert "attention: xla (asked for 'auto' on 'gpu'): cuDNN cannot train this call: packed rows" in caplog.text
    assert dispatch.attention_for_call("cudnn", "xla", 2048, 64, True, (9, 0)) == "cudnn"
    assert dispatch.attention_for_call("splash", None, 2047, 64, True) == "splash"
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' cannot train this call: .*S=2047; use "
                                         r"attention_impl='auto'"):
        dispatch.attention_for_call("cudnn", None, 2047, 64, True, (9, 0))


# ----------------------------------------------------------------------------- lowered for CUDA from this host
@pytest.fixture
def _cudnn_version(monkeypatch):
    """jaxlib's cuDNN version query is absent without the CUDA plugin: it answers 9.10 (JAX's lowering is real)."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "cuda_versions",
                        types.SimpleNamespace(cudnn_get_version=lambda: 91000))


def _cudnn_calls(impl: str, seq: int, fallback: str | None = None) -> list[str]:
    x = jax.ShapeDtypeStruct((2, seq, 4, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, seq), jnp.int32)

    def loss(q, k, v, seg):
        out = attention(q, k, v, segment_ids=seg, impl=impl, platform="gpu", fallback=fallback)
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x, seg).lower(lowering_platforms=("cuda",)).as_text()
    return re.findall(r"custom_call @(__cudnn\$fmha\w+)", text)


@pytest.mark.usefixtures("_cudnn_version")
def test_packed_training_at_an_odd_length_lowers_to_xla_under_auto():
    assert _cudnn_calls("auto", 256) == ["__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"]
    assert _cudnn_calls("auto", 255) == []                      # XLA attention: no cuDNN call, no crash
    assert _cudnn_calls("cudnn", 255, fallback="xla") == []     # the model's resolved `auto` (Compute fallback)
    with pytest.raises(ValueError, match=r"'cudnn' cannot train this call: .*S=255"):
        _cudnn_calls("cudnn", 255)                              # asked for cuDNN: an error while tracing


@pytest.mark.usefixtures("_cudnn_version")
def test_model_resolved_for_gpu_falls_back_at_an_odd_length():
    """The fallback travels from Compute.resolve through the model to each attention call."""
    from phi_jax.model import abstract_model

    cfg = PhiConfig.preset("tiny")
    calls = {}
    for name, compute in (("auto", Compute(dtype="bfloat16")), ("cudnn", Compute(dtype="bfloat16",
                                                                                   attention_impl="cudnn"))):
        from flax import nnx

        model = abstract_model(cfg, compute.resolve("gpu", (9, 0)))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params, tokens, seg, graphdef=graphdef):
            logits, _ = nnx.merge(graphdef, params)(tokens, segment_ids=seg)
            return jnp.mean(logits)

        for seq in (64, 63):
            tokens = jax.ShapeDtypeStruct((2, seq), jnp.int32)
            try:
                text = jax.jit(jax.grad(loss)).trace(params, tokens, tokens).lower(
                    lowering_platforms=("cuda",)).as_text()
                calls[name, seq] = len(re.findall(r"custom_call @__cudnn\$fmha", text)) > 0
            except ValueError as e:
                calls[name, seq] = str(e)
    assert calls["auto", 64] is True and calls["auto", 63] is False
    assert calls["cudnn", 64] is True and "S=63" in calls["cudnn", 63]


def test_cudnn_on_cpu_is_refused_when_the_trainer_is_built():
    """phi_jax.train.setup builds the trainer before it lowers and compiles the step: the error comes first."""
    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import make_mesh
    from phi_jax.trainer import build_trainer

    with pytest.raises(ValueError, match=r"attention_impl='cudnn' cannot run on 'cpu': cudnn runs on \('gpu',\)"):
        build_trainer(PhiConfig.preset("tiny"), Compute(dtype="bfloat16", attention_impl="cudnn"),
                      make_optimizer(1e-3), make_mesh(devices=jax.devices()[:1]))


def test_train_with_cudnn_on_cpu_fails_before_compiling(tmp_path, monkeypatch):
    """`python -m phi_jax.train --config.attention_impl=cudnn` on a CPU: the error, and no step compiled."""
    from runs import make_shards, tiny_config

    from phi_jax.train import train

    def no_compile(*args, **kwargs):
        raise AssertionError("the train step was compiled before the error")
    monkeypatch.setattr(jax.stages.Lowered, "compile", no_compile)
    c = tiny_config(make_shards(tmp_path / "data"), attention_impl="cudnn", dtype="bfloat16")
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' cannot run on 'cpu'"):
        train(c, tmp_path / "run")
