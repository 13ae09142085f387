"""phi_jax.gpu_targets without the CUDA plugin: the GPU specs, the target configs' figures, and the errors that say
what is missing. The configs compile for real in tests/test_compile_gpu_xla.py (marker gpu_compile)."""

from __future__ import annotations

import re

import pytest

from phi_jax import gpu_targets


@pytest.mark.parametrize(("spec", "want"), [("h100:8", ("h100", 8)), ("a100:1", ("a100", 1)),
                                            ("h100:16", ("h100", 16))])
def test_parse_spec(spec, want):
    assert gpu_targets.parse_spec(spec) == want


@pytest.mark.parametrize("spec", ["h100", "v100:8", "h100:0", "h100:12", "h100:x", "H100:8"])
def test_bad_spec_names_the_form(spec):
    with pytest.raises(ValueError, match="NAME:COUNT"):
        gpu_targets.parse_spec(spec)


def test_topology_is_eight_gpus_per_host():
    assert [gpu_targets.topology(n) for n in (1, 4, 8, 16, 64)] == ["1x1x1", "1x1x4", "1x1x8", "1x2x8", "1x8x8"]


# The spec-sheet figures each config must carry: SMs, FP32 lanes per SM, L2, compute capability, the driver's name.
SPEC = {"h100": (132, 128, 50 * 2**20, 9, "NVIDIA H100 80GB HBM3"),
        "a100": (108, 64, 40 * 2**20, 8, "NVIDIA A100-SXM4-80GB")}


@pytest.mark.parametrize("name", sorted(gpu_targets.TARGETS))
def test_target_configs_hold_the_spec_sheet_figures(name):
    text = gpu_targets.target_config(name)
    field = lambda key: re.search(rf"\b{key}:\s*(\S+)", text)[1]
    sms, fpus, l2, major, kind = SPEC[name]
    assert int(field("core_count")) == sms and int(field("fpus_per_core")) == fpus and int(field("l2_cache_size")) == l2
    assert re.search(rf"cuda_compute_capability {{ major: {major} minor: 0 }}", text)
    assert f'device_description_str: "{kind}"' in text
    assert 79 < gpu_targets.device_memory_bytes(name) / 2**30 < 80   # "80 GB" as the driver reports it
    # every figure names its source
    for line in text.splitlines():
        if re.match(r"\s+\w+: \d", line):
            assert re.search(r"# \[(WP|DS|PG|DRV)\]", line), line


def test_unknown_target_is_an_error():
    with pytest.raises(ValueError, match="no target config"):
        gpu_targets.target_config("v100")


def test_gpu_devices_names_what_is_missing(monkeypatch):
    for key in gpu_targets.DEVICELESS_GPU_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="JAX_SKIP_CUDA_CONSTRAINTS_CHECK"):
        gpu_targets.gpu_devices("h100:8")
    try:
        import jax_cuda12_plugin  # noqa: F401
    except ImportError:
        for key, value in gpu_targets.DEVICELESS_GPU_ENV.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(RuntimeError, match=r"\.\[cuda12\]"):
            gpu_targets.gpu_devices("h100:8")
