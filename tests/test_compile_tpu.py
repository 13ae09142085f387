"""The real TPU compiler (the pinned `libtpu` wheel, deviceless) compiles every Mosaic kernel of phi_jax, splash
attention as `attention_impl=auto` calls it on a TPU, and the phi-1.5 train step of configs/phi15.py on an 8-chip
v5e, within HBM; a control kernel broken on purpose (VMEM overflow) must fail to compile.

All compiles run in one subprocess (tests/_tpu_compile_worker.py): libtpu's deviceless mode needs its environment
before JAX starts, and this test process already runs JAX on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

libtpu = pytest.importorskip("libtpu", reason="libtpu (the [tpu-compile] extra, in requirements-dev.txt) compiles "
                                               "for TPU without one")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("tpu_compile") / "records.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    proc = subprocess.run([sys.executable, "-m", "tests._tpu_compile_worker", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return {r["name"]: r for r in json.loads(out.read_text())["records"]}


def _names(records, *words):
    return [n for n in records if all(w in n for w in words)]


def test_every_kernel_compiles_for_v5e_and_v6e(records):
    failed = {n: r["error"][:400] for n, r in records.items() if not r["ok"] and "CONTROL" not in n
              and "train step" not in n}
    assert not failed, failed
    for topology in ("v5e", "v6e"):
        for kind in ("splash (attention_impl=auto)", "pallas flash_attention_tpu"):
            cases = [n for n in _names(records, topology, kind, "fwd+bwd") if "float32" not in n]
            assert len(cases) == 4, cases  # hd 64/80/128, S 2048 and 999, with and without segment ids
        assert len(_names(records, topology, "fused_dense_tpu")) == 2


def test_fp32_flash_attention_compiles_with_fp32_matmuls(records):
    """fp32 inputs: the Mosaic kernels compile, and every matmul in them asks for fp32 contraction rather than
    leaving the MXU's passes to the default (`flash_attention_tpu._precision`)."""
    for topology in ("v5e", "v6e"):
        (name,) = _names(records, topology, "flash_attention_tpu", "float32")
        r = records[name]
        assert r["ok"], r.get("error")
        assert set(r["lowered"]) == {"flash_attention_fwd_tpu", "flash_attention_dkv_tpu", "flash_attention_dq_tpu"}
        for kernel, precisions in r["lowered"].items():
            # two bodies (diagonal-crossing and interior blocks): 2 matmuls forward, 4 in dK/dV, 3 in dQ, each
            assert len(precisions) == {"fwd": 4, "dkv": 8, "dq": 6}[kernel.split("_")[2]], (kernel, precisions)
            assert set(precisions) == {"fp32"}, (kernel, precisions)


def test_broken_kernel_fails_to_compile(records):
    """The check can fail: a blocked kernel compiles with 1 MiB blocks and is rejected with 16 MiB blocks."""
    for topology in ("v5e", "v6e"):
        ok, broken = (records[f"{topology}:2x2 CONTROL copy kernel with {rows}x1024 fp32 blocks"]
                      for rows in (256, 4096))
        assert ok["ok"], ok.get("error")
        assert not broken["ok"], f"{topology}: 16 MiB blocks compiled"
        assert "CompileTimeScopedVmemOom" in broken["error"], broken["error"][:1000]


def test_phi15_train_step_fits_v5e_hbm(records):
    (name,) = _names(records, "train step")
    r = records[name]
    assert r["ok"], r.get("error")
    assert "static_sparsity_splash" in r["result"]["pallas_kernels"]  # auto -> splash attention on a TPU
    need, available = r["result"]["arguments_plus_temporaries_gib"], r["result"]["available_gib"]
    assert 0 < need <= available == 15.75, f"{name}: {need:.2f} GiB per chip > {available} GiB of HBM"
    # FSDP over 8 chips: each holds 1/8 of the fp32 parameters and Adam moments (12 bytes x 1.42B parameters).
    assert abs(r["result"]["per_device_gib"]["train_state (params + optimizer)"] - 12 * 1.418e9 / 8 / 2**30) < 0.1


@pytest.mark.parametrize("start", [1, 2, 3, 8, 40])
def test_largest_micro_batch_search(start):
    """plan_memory's search finds the boundary from any first guess, using the compiler's own OOM figures
    (message format as libtpu 0.0.42 prints it), with one fitting compile when the guess is high."""
    from tools.plan_memory import largest_micro_batch

    def compile_at(mb):  # 3.8 GiB + 4.4 GiB per sequence against 15.75 GiB: micro-batch 2 is the largest
        need = 3.8 + 4.4 * mb
        if need <= 15.75:
            return {"fits": True}
        return {"fits": False, "compiler_message": "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                f"required for HLO temporaries ({need:.2f}G) exceeds available HBM (15.75G)."}

    best, probes = largest_micro_batch(compile_at, start)
    assert best == 2 and probes[2]["fits"] and not probes[3]["fits"]
    if start > 2:
        assert sum(r["fits"] for r in probes.values()) == 1, sorted(probes)
