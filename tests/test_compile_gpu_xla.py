"""XLA:GPU, the compiler a GPU run uses, compiles phi_jax for an H100 and an A100 on this CPU host (no GPU, no driver).

Marker `gpu_compile`, left out of the default run: it needs JAX's CUDA plugin, which the [cuda12] extra installs
with its CUDA wheels (~5.5 GB), too large for CI. Run it in a virtual environment of its own:

    python3 -m venv ~/venv-cuda && ~/venv-cuda/bin/pip install -e ".[cuda12]" -r requirements-dev.txt
    ~/venv-cuda/bin/python -m pytest -q -m gpu_compile tests/test_compile_gpu_xla.py

The GPUs are the target configs of phi_jax/gpu_targets; the deviceless environment must be set before JAX's backends
start, so every compile runs in a subprocess. Checked: phi_jax's Pallas Triton attention kernels compile with jaxlib's
own Triton (no spills, wgmma on sm_90a), cuDNN attention compiles (with segment ids as a bias), and the phi-1.5 train
step of configs/phi15.py fits 8 H100s at remat full while remat none does not (tools/plan_memory.py --topology=h100:8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.gpu_compile


@pytest.fixture(autouse=True, scope="module")
def _cuda_plugin():
    pytest.importorskip("jax_cuda12_plugin", reason="JAX's CUDA plugin (the [cuda12] extra) compiles for GPUs")


def _run(args: list[str], out: Path, timeout: int = 1500) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def attention_records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gpu_compile") / "attention.json"
    return _run(["tests._gpu_compile_worker", str(out)], out)["records"]


def test_attention_compiles_for_h100_and_a100(attention_records):
    kinds = {"h100:1": "NVIDIA H100 80GB HBM3", "a100:1": "NVIDIA A100-SXM4-80GB"}
    assert len(attention_records) == 8
    for r in attention_records:
        assert r["ok"], (r["name"], r.get("error"))
        assert r["device_kind"] == kinds[r["gpu"]]
        if r["impl"] == "pallas":   # the three Pallas kernels, compiled by jaxlib's Triton inside XLA
            assert r["custom_calls"] == ["__gpu$xla.gpu.triton"], r
        else:                       # cuDNN's fused attention; packed documents enter as a bias
            kind = "ScaleBias" if r["segment_ids"] else ""
            assert f"__cudnn$fmha{kind}Softmax" in r["custom_calls"], r
            assert f"__cudnn$fmha{kind}SoftmaxBackward" in r["custom_calls"], r


def test_triton_kernels_compiled_by_jaxlib_do_not_spill(tmp_path):
    """The attention kernels' PTX as jaxlib's Triton writes it inside XLA:GPU, assembled by XLA's ptxas."""
    out = tmp_path / "ptx.json"
    kernels = ["attn_fwd", "attn_fwd_seg", "attn_dkv_seg", "attn_dq_seg"]
    rows = _run(["tools.ptx_stats", "--compiler=xla", "--kernels", *kernels, "--out", str(out)], out)["rows"]
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in kernels for a in ("sm_90a", "sm_80")}
    spills = [(r["kernel"], r["arch"], r["spill_store_bytes"], r["spill_load_bytes"]) for r in rows
              if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spills, spills
    assert all(r["wgmma"] == (r["arch"] == "sm_90a") for r in rows), rows


def test_phi15_step_fits_8_h100_with_remat_full_and_not_without(tmp_path):
    plans = {}
    for remat in ("full", "none"):
        out = tmp_path / f"{remat}.json"
        plans[remat] = _run(["tools.plan_memory", "--topology=h100:8", f"--remat={remat}", "--micro_batch=8",
                             f"--out={out}"], out)
    full, none = plans["full"], plans["none"]
    assert full["compiler"].startswith("XLA:GPU") and full["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert full["topology"] == "h100:8" and full["mem_fraction"] == 0.75
    assert full["available_gib"] == 0.75 * full["device_memory_gib"]
    assert full["fits"] and not none["fits"], (full, none)
    assert none["arguments_plus_temporaries_gib"] > full["available_gib"] > full["arguments_plus_temporaries_gib"]
    # FSDP over 8 GPUs: each holds 1/8 of the fp32 parameters and Adam moments (12 bytes x 1.42B parameters).
    assert abs(full["per_device_gib"]["train_state (params + optimizer)"] - 12 * 1.418e9 / 8 / 2**30) < 0.1
