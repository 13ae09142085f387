"""`python -m tools.accelerator_check --dry_run`: every stage's code path on CPU at tiny shapes, figures checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("accelerator_check") / "check.json"
    proc = subprocess.run([sys.executable, "-m", "tools.accelerator_check", "--dry_run", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_stage_passes(report):
    failed = {name: r.get("error") or r.get("summary") for name, r in report["stages"].items() if not r["ok"]}
    assert not failed, failed
    assert list(report["stages"]) == ["device", "tests", "attention", "dense", "train_100m", "step_phi15"]
    assert report["ok"] and report["device"].endswith("cpu (cpu)")
    assert "skipped" in report["stages"]["tests"]["summary"]  # the accelerator tests ran (and skip on CPU)


def test_attention_and_dense_figures(report):
    rows = {(r["impl"], r["segment_ids"]): r for r in report["stages"]["attention"]["rows"]}
    for packed in (False, True):
        for impl in ("pallas", "splash"):  # interpreted on CPU: same outputs as XLA, a positive rate
            assert rows[impl, packed]["max_abs_diff_vs_xla"] < 1e-5, rows[impl, packed]
            assert rows[impl, packed]["fwd_bwd_tflops"] > 0
        assert "cannot run on 'cpu'" in rows["cudnn", packed]["skipped"]
    (dense,) = report["stages"]["dense"]["rows"]
    assert dense["fused_fwd_bwd_tflops"] > 0 and dense["xla_fwd_bwd_tflops"] > 0


def test_training_figures(report):
    rows = {r["attention_impl"]: r for r in report["stages"]["train_100m"]["rows"]}
    assert "skipped" in rows["cudnn"]
    assert rows["splash"]["tokens_per_sec"] > 0 and rows["xla"]["tokens_per_sec"] > 0
    # the same model, data and initialisation: the first steps' losses agree across attention implementations
    assert abs(rows["splash"]["loss"] - rows["xla"]["loss"]) < 1e-4
    step = report["stages"]["step_phi15"]
    assert step["loss_is_finite"] and step["tokens_per_sec"] > 0


def test_a_stage_over_budget_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    from tools import accelerator_check

    monkeypatch.setitem(accelerator_check.STAGES, "dense", (0.01, 0.01))
    out = tmp_path / "check.json"
    report = accelerator_check.main(["--dry_run", "--stages=dense,device", f"--out={out}"])
    assert report["stages"]["dense"] == {**report["stages"]["dense"], "ok": False,
                                         "error": "ran past its budget of 0.01 s"}
    assert report["stages"]["device"]["ok"] and not report["ok"]
    assert json.loads(out.read_text())["stages"]["device"]["backend"] == "cpu"
