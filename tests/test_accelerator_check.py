"""`python -m tools.accelerator_check --dry_run`: every stage's code path on CPU at tiny shapes, figures checked."""

from __future__ import annotations

import json
import re
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
    assert report["stages"]["tests"]["note"] == "every accelerator test skips on CPU, as a dry run expects"


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


# ---------------------------------------------------------------------- a GPU/TPU host where JAX runs on the CPU
def _no_stage_may_run(monkeypatch):
    from tools import accelerator_check

    def refuse(*args, **kwargs):
        raise AssertionError("a stage ran after the preflight should have stopped the check")
    monkeypatch.setattr(accelerator_check, "_run_stage", refuse)
    monkeypatch.setattr(accelerator_check, "_run_tests", refuse)


def test_gpu_present_and_jax_on_cpu_stops_before_any_stage(tmp_path, monkeypatch):
    """As if this CPU host had a GPU: the hardware probe is faked, JAX's backend is really asked (CPU here)."""
    from tools import accelerator_check

    monkeypatch.setattr(accelerator_check, "accelerator_evidence",
                        lambda: {"GPU": ["nvidia-smi at /usr/bin/nvidia-smi", "/dev/nvidia0"], "TPU": []})
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # JAX picks its backend itself, as on a user's host
    _no_stage_may_run(monkeypatch)
    out = tmp_path / "check.json"
    with pytest.raises(SystemExit) as stopped:
        accelerator_check.main([f"--out={out}"])
    message = stopped.value.code
    assert isinstance(message, str)  # sys.exit(message): exit status 1, the message on stderr
    assert message.startswith("This host has a GPU (nvidia-smi at /usr/bin/nvidia-smi; /dev/nvidia0) but JAX runs "
                              "on 'cpu': JAX is installed without the GPU plugin."), message
    assert 'pip install -e ".[cuda12]"' in message
    written = json.loads(out.read_text())
    assert written["ok"] is False and written["error"] == message and written["stages"] == {}


@pytest.mark.parametrize(("evidence", "backend", "expected"), [
    ({"GPU": [], "TPU": ["/dev/accel0", "TPU_ACCELERATOR_TYPE=v5litepod-8"]}, "cpu",
     'JAX is installed without the TPU plugin. Fix: pip install -e ".[tpu]"'),
    ({"GPU": [], "TPU": []}, "cpu", "this host shows no GPU or TPU"),
    ({"GPU": ["/dev/nvidia0"], "TPU": []}, "none: JAX failed to start (RuntimeError: boom)", '".[cuda12]"'),
    ({"GPU": ["/dev/nvidia0"], "TPU": []}, "gpu", ""),
    ({"GPU": [], "TPU": ["/dev/vfio/0"]}, "tpu", ""),
])
def test_preflight(monkeypatch, evidence, backend, expected):
    from tools import accelerator_check

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(accelerator_check, "accelerator_evidence", lambda: evidence)
    monkeypatch.setattr(accelerator_check, "jax_backend", lambda: backend)
    problem = accelerator_check.preflight()
    assert (expected in problem) if expected else problem == "", problem


def test_preflight_names_jax_platforms_when_it_forces_the_cpu(monkeypatch):
    from tools import accelerator_check

    monkeypatch.setattr(accelerator_check, "accelerator_evidence", lambda: {"GPU": ["/dev/nvidia0"], "TPU": []})
    monkeypatch.setattr(accelerator_check, "jax_backend", lambda: "cpu")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    problem = accelerator_check.preflight()
    assert "JAX_PLATFORMS=cpu is set. Fix: unset JAX_PLATFORMS" in problem and '".[cuda12]"' in problem


def test_the_hardware_probe_reads_this_host(monkeypatch):
    from tools import accelerator_check

    for key in accelerator_check.TPU_ENV:
        monkeypatch.delenv(key, raising=False)
    assert accelerator_check.accelerator_evidence() == {"GPU": [], "TPU": []}  # this CPU host
    monkeypatch.setenv("TPU_WORKER_ID", "0")
    assert accelerator_check.accelerator_evidence()["TPU"] == ["TPU_WORKER_ID=0"]


@pytest.mark.parametrize(("returncode", "summary", "dry_run", "ok"), [
    (0, "12 skipped in 3.10s", False, False),           # every kernel test skipped on the accelerator: a failure
    (0, "12 skipped in 3.10s", True, True),             # a dry run on CPU: they skip by design
    (5, "12 deselected in 0.50s", False, False),        # nothing collected
    (0, "10 passed, 2 skipped in 40.00s", False, True),
    (1, "1 failed, 11 passed in 41.00s", False, False),
])
def test_tests_verdict(returncode, summary, dry_run, ok):
    from tools.accelerator_check import tests_verdict

    result = tests_verdict(returncode, ["....", summary], dry_run)
    assert result["ok"] is ok and result["summary"] == summary
    assert ("no accelerator test ran" in result["error"]) if "skipped" in summary and not ok else True


def test_without_pytest_the_tests_stage_is_not_run_and_not_ok(tmp_path, monkeypatch, capsys):
    from tools import accelerator_check

    monkeypatch.setattr(accelerator_check, "pytest_version", lambda: None)
    report = accelerator_check.main(["--dry_run", "--stages=tests", f"--out={tmp_path / 'check.json'}"])
    first_line = capsys.readouterr().out.splitlines()[0]
    assert "pytest is NOT installed" in first_line and "requirements-dev.txt" in first_line
    tests = report["stages"]["tests"]
    assert tests["not_run"] and not tests["ok"] and not report["ok"]
    assert tests["error"].startswith("not run: pytest is not installed")


def test_a_stage_that_times_out_keeps_the_rows_it_saved(tmp_path, monkeypatch):
    """A stage saves its rows as it measures them; killed at its budget, the rows saved so far are kept."""
    from tools import accelerator_check

    fake_stage = ("import json, os, sys, time\n"
                  "out = sys.argv[1]\n"
                  "for n in range(1, 3):\n"
                  "    json.dump({'rows': [{'impl': 'xla', 'n': i} for i in range(n)]}, open(out + '.tmp', 'w'))\n"
                  "    os.replace(out + '.tmp', out)\n"
                  "time.sleep(60)\n")
    monkeypatch.setattr(accelerator_check, "_stage_command",
                        lambda name, out, dry_run: [sys.executable, "-c", fake_stage, str(out)])
    monkeypatch.setitem(accelerator_check.STAGES, "attention", (5, 5))
    report = accelerator_check.main(["--dry_run", "--stages=attention", f"--out={tmp_path / 'check.json'}"])
    attention = report["stages"]["attention"]
    assert attention["rows"] == [{"impl": "xla", "n": 0}, {"impl": "xla", "n": 1}]
    assert not attention["ok"] and attention["error"] == ("ran past its budget of 5 s; what it measured before "
                                                          "is kept")
    assert json.loads((tmp_path / "check.json").read_text())["stages"]["attention"]["rows"] == attention["rows"]


def test_budgets_fit_eight_minutes_and_the_docstring_states_them():
    from tools import accelerator_check

    assert sum(budget for budget, _ in accelerator_check.STAGES.values()) == 480
    assert accelerator_check.STAGES["step_phi15"][0] == max(b for b, _ in accelerator_check.STAGES.values())
    for name, (budget, _) in accelerator_check.STAGES.items():
        assert re.search(rf"^  {name}\s+{budget} s  ", accelerator_check.__doc__, re.M), name
