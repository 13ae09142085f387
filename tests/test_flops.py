"""phi_jax.flops: the spec-sheet peak of each accelerator's device kind (as JAX reports it), the unknown kind that
costs the MFU figure but not the run, and the FLOPs per token."""

from __future__ import annotations

import logging
import types

import jax
import pytest

from phi_jax import flops
from phi_jax.config import PhiConfig

# (device kind as JAX reports it, dense bf16 peak): each one's figure is the spec sheet's (phi_jax/flops.py).
KINDS = [
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),            # v5e
    ("TPU v5", 459e12),                 # v5p: a prefix of v5e's kind, matched whole
    ("TPU v6 lite", 918e12),            # v6e
    ("TPU7x", 2307e12),                 # v7x
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H800", 989e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),            # not L4's
    ("NVIDIA A10", 125e12),
    # unknown kinds: no figure (never a neighbour's by prefix)
    ("NVIDIA A10G", None),              # "a10" must not match
    ("NVIDIA L40", None),               # "l4" must not match
    ("TPU v5p", None),                  # not a kind JAX reports; "tpu v5" matches only whole words
    ("TPU v3", None),
    ("Tesla V100-SXM2-16GB", None),
    ("AMD Instinct MI300X", None),
]


@pytest.mark.parametrize(("kind", "peak"), KINDS)
def test_spec_sheet_peak_by_device_kind(kind, peak):
    assert flops.spec_sheet_peak(kind) == peak


def _fake_device(monkeypatch, kind: str, backend: str) -> None:
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(device_kind=kind)])
    monkeypatch.setattr(jax, "default_backend", lambda: backend)


def test_known_accelerator_names_its_source(monkeypatch):
    _fake_device(monkeypatch, "TPU v5", "tpu")
    assert flops.peak_flops_per_device() == (459e12, "spec sheet (TPU v5)")
    assert flops.peak_flops_per_device(123.0) == (123.0, "config")


def test_unknown_accelerator_warns_and_gives_no_peak(monkeypatch, caplog):
    _fake_device(monkeypatch, "NVIDIA RTX PRO 6000", "gpu")
    with caplog.at_level(logging.WARNING, logger="phi_jax"):
        peak, why = flops.peak_flops_per_device()
    assert peak is None and "'NVIDIA RTX PRO 6000'" in why and "--config.peak_flops_per_device" in why
    assert [r.getMessage() for r in caplog.records] == [why]
    assert flops.peak_flops_per_device(5e14) == (5e14, "config")  # the override still gives MFU


def test_cpu_gets_the_nominal_figure(monkeypatch):
    _fake_device(monkeypatch, "cpu", "cpu")
    peak, source = flops.peak_flops_per_device()
    assert peak > 0 and source.startswith("nominal CPU figure")


def test_training_metrics_omit_mfu_without_a_peak():
    """train.Run.log_metrics: MFU is tokens/s x FLOPs per token / (peak x devices), and absent without a peak."""
    from phi_jax.train import Run

    written = []
    for peak in (1e12, None):
        run = types.SimpleNamespace(
            c=types.SimpleNamespace(batch_size=4, seq_len=8, total_steps=10), flops=(100.0, peak),
            data=types.SimpleNamespace(tokens_seen=lambda *a: {}),
            writer=types.SimpleNamespace(write=lambda step, m: written.append(m)))
        state = types.SimpleNamespace(total_skipped=0)
        Run.log_metrics(run, 1, state, {"loss": 1.0, "skipped": 0.0}, step_time=0.5)
    with_peak, without = written
    assert with_peak["mfu"] == pytest.approx(4 * 8 / 0.5 * 100.0 / (1e12 * jax.device_count()))
    assert "mfu" not in without and without["tokens_per_sec"] == 64.0


def test_phi15_flops_per_token():
    """The docstring's closed form: 6 x 1.313B matmul parameters + 6 x 24 layers x 2048 x 2048."""
    cfg = PhiConfig.preset("phi-1.5")
    matmul = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    assert flops.flops_per_token(cfg, 2048) == 6 * matmul + 6 * 24 * 2048 * 2048
    assert flops.flops_per_token(cfg, 2048) == pytest.approx(8.48e9, rel=1e-3)
