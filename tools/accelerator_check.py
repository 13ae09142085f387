"""The acceptance run for the first GPU or TPU host: tests, kernel speed, training speed and the phi-1.5 step.

    python -m tools.accelerator_check                                       # on the GPU/TPU host, <= 8 min
    python -m tools.accelerator_check --dry_run --out=/tmp/check.json       # every code path on CPU, tiny shapes

First, before any stage, JAX must run on the accelerator this host has: where a GPU or TPU is present (nvidia-smi
on PATH, /dev/nvidia*, /dev/accel*, /dev/vfio/N, TPU_ACCELERATOR_TYPE / TPU_WORKER_ID) and JAX's default backend
is the CPU, the check stops with one message naming the cause (JAX installed without the accelerator's plugin) and
the fix (`pip install -e ".[cuda12]"` or `".[tpu]"`), exit status 1; a host with no accelerator at all is told to
use --dry_run. JAX is asked in a subprocess (seconds, outside the stage budgets): a TPU opened by this process would
be held from the stages.

Stages, in order, each in its own subprocess under a time budget (seconds on an accelerator; 480 in all, the budget
of the phi-1.5 step sized for its compile, which takes 1-3 minutes for the TPU compiler on a 2-core host and under
2 for XLA:GPU). A stage that fails or runs out of time is recorded and the next one runs. Each stage writes its rows
to its results as it measures them, so one that runs out of time keeps what it measured; the results file is
rewritten (temp file + rename) after every stage.
  device       20 s  the device kind, count, versions and spec-sheet peak
  tests        90 s  pytest -m accelerator (the kernels compiled and compared with their references); pytest is a
                     development tool (requirements-dev.txt): without it the stage is not run, and not ok. Every
                     test skipped is a failure (the kernels did not run on the accelerator).
  attention    60 s  forward+backward TFLOP/s at phi-1.5 shapes (S 2048, 32 heads, head_dim 64, bf16, causal),
                     with and without segment ids, for every attention implementation this platform runs
  dense        35 s  the fused dense kernel against XLA at phi-1.5's layer shapes, forward+backward TFLOP/s
  train_100m  120 s  phi-100m, ~30 steps per attention implementation: tokens/s and MFU (phi_jax.flops: 6 x
                     matmul parameters + causal attention, against the spec-sheet peak)
  step_phi15  155 s  one phi-1.5 train step (FSDP over the host's devices, remat full) at a micro-batch that fits:
                     building the state, the compile, and one step
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tools._bench import add_out_flag, command, write_json

ROOT = Path(__file__).resolve().parents[1]  # the checkout: pytest and the stages run from here
# name -> (budget in seconds on an accelerator, in --dry_run on CPU); 480 s in all on an accelerator.
STAGES = {"device": (20, 60), "tests": (90, 180), "attention": (60, 120), "dense": (35, 90),
          "train_100m": (120, 120), "step_phi15": (155, 90)}
ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")
TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID")
EXTRAS = {"GPU": "cuda12", "TPU": "tpu"}  # the pyproject extra that brings JAX's runtime for each (README)


# --------------------------------------------------------------------------------------------------- preflight
def accelerator_evidence() -> dict[str, list[str]]:
    """What on this host says a GPU or TPU is present, whatever JAX sees: {"GPU": [...], "TPU": [...]}, each a
    list of findings (empty when there are none). The one probe of the hardware (tests fake it)."""
    gpu, tpu = [], []
    if shutil.which("nvidia-smi"):
        gpu.append(f"nvidia-smi at {shutil.which('nvidia-smi')}")
    if found := sorted(glob.glob("/dev/nvidia[0-9]*")):
        gpu.append(", ".join(found[:4]))
    if found := sorted(glob.glob("/dev/accel*")):
        tpu.append(", ".join(found[:4]))
    if found := sorted(p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()):
        tpu.append(", ".join(found[:4]))
    tpu += [f"{k}={os.environ[k]}" for k in TPU_ENV if os.environ.get(k)]
    return {"GPU": gpu, "TPU": tpu}


def jax_backend() -> str:
    """JAX's default backend as a fresh process on this host sees it ("cpu", "gpu", "tpu"), or why it failed."""
    try:
        proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], cwd=ROOT,
                              capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "none: `import jax; jax.default_backend()` ran past 180 s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return f"none: JAX failed to start ({(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]})"
    return lines[-1].strip()


def preflight() -> str:
    """"" when JAX runs on an accelerator; otherwise the one message that stops the check: the cause and the fix."""
    backend = jax_backend()
    if backend in ACCELERATOR_BACKENDS:
        return ""
    evidence = accelerator_evidence()
    platforms = os.environ.get("JAX_PLATFORMS", "")
    for kind, found in evidence.items():
        if not found:
            continue
        install = f'pip install -e ".[{EXTRAS[kind]}]" (README, "On a TPU VM or a GPU host")'
        if platforms and "cpu" in platforms:
            return (f"This host has a {kind} ({'; '.join(found)}) but JAX runs on {backend!r}: JAX_PLATFORMS="
                    f"{platforms} is set. Fix: unset JAX_PLATFORMS; if JAX then still runs on the CPU, it is installed "
                    f"without the {kind} plugin: {install}.")
        return (f"This host has a {kind} ({'; '.join(found)}) but JAX runs on {backend!r}: JAX is installed without "
                f"the {kind} plugin. Fix: {install}; `python -c 'import jax; print(jax.devices())'` must list {kind} "
                "devices; then run this check again.")
    return (f"JAX runs on {backend!r} and this host shows no GPU or TPU (no nvidia-smi, /dev/nvidia*, /dev/accel*, "
            f"/dev/vfio/N or {'/'.join(TPU_ENV)}): on a CPU host, run the check with --dry_run.")


def pytest_version() -> str | None:
    """The installed pytest's version, or None: the tests stage needs it, and it is a development tool."""
    if importlib.util.find_spec("pytest") is None:
        return None
    with contextlib.suppress(PackageNotFoundError):
        return version("pytest")
    return "unknown version"


# ------------------------------------------------------------------------------------------------------ stages
def stage_device(dry_run: bool, save) -> dict:
    import jax

    from phi_jax.flops import peak_flops_per_device

    devices = jax.devices()
    result = {"backend": jax.default_backend(), "device_kind": devices[0].device_kind, "device_count": len(devices),
              "jax": jax.__version__, "python": sys.version.split()[0]}
    for package in ("jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin"):
        with contextlib.suppress(PackageNotFoundError):
            result[package] = version(package)
    result["peak_flops_per_device"], result["peak_source"] = peak_flops_per_device()  # None: unknown, no MFU
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "bytes_limit" in stats:
        result["memory_gib_per_device"] = stats["bytes_limit"] / 2**30
    return result


def stage_attention(dry_run: bool, save) -> dict:
    import jax.numpy as jnp

    from tools._kernel_rows import attention_rows

    b, s, n, h = (1, 256, 2, 64) if dry_run else (4, 2048, 32, 64)
    dtype = jnp.float32 if dry_run else jnp.bfloat16  # fp32 on CPU: bf16 is no faster there and less exact
    warmup, iters = (1, 1) if dry_run else (2, 10)
    convention = {"flops_convention": "causal: 2*2*B*N*S*S*H/2 forward, x3.5 forward+backward"}
    rows = attention_rows(b, s, n, h, dtype, warmup, iters, passes=("fwd_bwd",),
                          on_row=lambda rows: save({"rows": rows, **convention}))
    return {"rows": rows, **convention}


def stage_dense(dry_run: bool, save) -> dict:
    import jax.numpy as jnp

    from tools._kernel_rows import PHI15_LAYERS, dense_rows

    m, layers = (128, [("fc1 (tiny)", 256, 512, "gelu_new")]) if dry_run else (8192, PHI15_LAYERS)
    dtype = jnp.float32 if dry_run else jnp.bfloat16
    warmup, iters = (1, 1) if dry_run else (2, 10)
    return {"rows": dense_rows([m], dtype, warmup, iters, layers, passes=("fwd_bwd",),
                               on_row=lambda rows: save({"rows": rows}))}


def stage_train_100m(dry_run: bool, save) -> dict:
    from phi_jax.config import ATTENTION_IMPLS, Compute
    from phi_jax.flops import flops_per_token, peak_flops_per_device
    from tools._bench import time_steps, train_setup
    from tools._kernel_rows import attention_unavailable

    model, seq, batch, steps, dtype = ("tiny", 64, 2, 2, "float32") if dry_run else ("phi-100m", 2048, 8, 30,
                                                                                    "bfloat16")
    peak, peak_source = peak_flops_per_device()  # None: an accelerator without a spec-sheet peak (no MFU)
    if dry_run:
        peak, peak_source = None, "dry run: no peak"
    rows = []
    # The dry run trains with two implementations (and skips cudnn): the same code path at a third of the cost.
    for impl in ("splash", "cudnn", "xla") if dry_run else ATTENTION_IMPLS:
        row = {"model": model, "attention_impl": impl, "seq_len": seq, "batch": batch, "dtype": dtype}
        why_not = attention_unavailable(impl, dtype)
        if why_not:
            rows.append({**row, "skipped": why_not})
            save({"rows": rows, "peak_flops_per_device": peak, "peak_source": peak_source})
            continue
        try:
            trainer, state, b = train_setup(model, seq, batch, Compute(dtype=dtype, attention_impl=impl))
            row.update(time_steps(trainer.train_step, state, b, steps))
            row["tokens_per_sec"] = tps = batch * seq / row["step_sec_median"]
            row["mfu"] = tps * flops_per_token(trainer.cfg, seq) / peak if peak else None
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rows.append(row)
        print(row, flush=True)
        save({"rows": rows, "peak_flops_per_device": peak, "peak_source": peak_source})
    return {"rows": rows, "peak_flops_per_device": peak, "peak_source": peak_source}


def stage_step_phi15(dry_run: bool, save) -> dict:
    import jax
    import numpy as np

    from phi_jax.config import Compute
    from phi_jax.sharding import make_mesh
    from tools._bench import time_steps, train_setup

    devices = jax.devices()
    memory = (devices[0].memory_stats() or {}).get("bytes_limit", 0) / 2**30 if not dry_run else 0
    # FSDP over this host's devices. Micro-batch per device: 2 fits a v5e chip (16 GiB) with 8 chips (measured
    # by the TPU compiler, docs/PERFORMANCE.md); 4 on 40+ GiB devices, where one device holds the whole 17 GiB
    # state plus remat-full activations.
    model, seq, micro = ("tiny", 64, 1) if dry_run else ("phi-1.5", 2048, 4 if memory >= 40 else 2)
    compute = Compute(dtype="float32" if dry_run else "bfloat16", remat="full")
    mesh = make_mesh(1, -1, 1, devices=devices[:1] if dry_run else devices)
    rows = micro * mesh.shape["fsdp"]
    result = {"model": model, "mesh": dict(mesh.shape), "micro_batch_per_device": micro, "seq_len": seq,
              "remat": "full"}
    start = time.perf_counter()
    trainer, state, batch = train_setup(model, seq, rows, compute, mesh, "fsdp")
    result["setup_sec (state + batch)"] = round(time.perf_counter() - start, 1)
    save({**result, "phase": "compiling the step"})
    timing = time_steps(trainer.train_step, state, batch, steps=1)
    result.update({"first_step_sec (compile + run)": timing["compile_sec"], "step_sec": timing["step_sec_median"],
                   "tokens_per_sec": rows * seq / timing["step_sec_median"], "loss": timing["loss"],
                   "loss_is_finite": bool(np.isfinite(timing["loss"]))})
    stats = devices[0].memory_stats() if not dry_run else None
    if stats and "peak_bytes_in_use" in stats:
        result["peak_gib_device0"] = stats["peak_bytes_in_use"] / 2**30
    return result


STAGE_FUNCTIONS = {"device": stage_device, "attention": stage_attention, "dense": stage_dense,
                   "train_100m": stage_train_100m, "step_phi15": stage_step_phi15}


# ------------------------------------------------------------------------------------------------ orchestration
def tests_verdict(returncode: int, lines: list[str], dry_run: bool) -> dict:
    """The tests stage's result from pytest's exit status and output. Every test skipped (or none collected) is a
    failure: on an accelerator the kernel tests must run there. In --dry_run, on CPU, they all skip by design."""
    summary = lines[-1] if lines else ""
    ran = any(f" {word}" in f" {summary}" for word in ("passed", "failed", "error"))
    result = {"returncode": returncode, "summary": summary,
              "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:50], "ok": returncode == 0}
    if returncode in (0, 5) and not ran:  # 5: no tests collected
        if dry_run:
            result.update(ok=True, note="every accelerator test skips on CPU, as a dry run expects")
        else:
            result.update(ok=False, error=f"no accelerator test ran ({summary or 'no output'}): the kernels were "
                                          "not compiled on this accelerator")
    return result


def _run_tests(dry_run: bool, budget: float, platform: str | None) -> dict:
    """pytest -m accelerator on this host's accelerator. tests/conftest.py defaults JAX to CPU, so the platform is
    named explicitly; --dry_run collects only the kernel tests (they skip on CPU). Without pytest: not run."""
    if pytest_version() is None:
        return {"ok": False, "not_run": True,
                "error": "not run: pytest is not installed (a development tool: pip install -r requirements-dev.txt)"}
    env = dict(os.environ)
    if platform and not dry_run:
        env["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(platform, platform)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "accelerator", "-p", "no:cacheprovider"]
    cmd += ["tests/test_flash_attention.py"] if dry_run else []
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
    return {"command": " ".join(cmd[1:]), **tests_verdict(proc.returncode, proc.stdout.strip().splitlines(), dry_run)}


def _stage_command(name: str, out: Path, dry_run: bool) -> list[str]:
    return [sys.executable, "-m", "tools.accelerator_check", f"--stage={name}", f"--stage_out={out}",
            *(["--dry_run"] if dry_run else [])]


def _run_stage(name: str, dry_run: bool, budget: float) -> dict:
    """Runs a stage in a subprocess. The stage saves its results as it goes: when it runs past its budget, what
    it measured is kept beside the error."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        try:
            proc = subprocess.run(_stage_command(name, out, dry_run), cwd=ROOT, capture_output=True, text=True,
                                  timeout=budget)
        except subprocess.TimeoutExpired:
            partial = json.loads(out.read_text()) if out.exists() else {}
            kept = "; what it measured before is kept" if partial else ""
            return {**partial, "ok": False, "error": f"ran past its budget of {budget} s{kept}"}
        result = json.loads(out.read_text()) if out.exists() else {}
        if proc.returncode != 0 or not result.pop("complete", False):
            return {**result, "ok": False, "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
        return {"ok": True, **result}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_flag(p, __file__)
    p.add_argument("--dry_run", action="store_true", help="CPU, tiny shapes, Pallas in interpret mode")
    p.add_argument("--stages", default=",".join(["device", "tests", *list(STAGE_FUNCTIONS)[1:]]))
    p.add_argument("--stage", default="", help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--stage_out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.stage:
        save = lambda partial: write_json(args.stage_out, partial)
        result = STAGE_FUNCTIONS[args.stage](args.dry_run, save)
        write_json(args.stage_out, {**result, "complete": True})
        return result

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    pytest_found = pytest_version()
    print(f"accelerator_check: stages {', '.join(stages)}; the tests stage runs pytest -m accelerator ("
          + (f"pytest {pytest_found})" if pytest_found else "pytest is NOT installed: that stage will count as not "
             "run; pip install -r requirements-dev.txt)"), flush=True)
    report = {"command": command(__file__, argv), "dry_run": args.dry_run,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}
    if not args.dry_run:
        problem = preflight()
        if problem:
            write_json(args.out, {**report, "ok": False, "error": problem})
            sys.exit(problem)
    platform = None
    for name in stages:
        budget = STAGES[name][1 if args.dry_run else 0]
        start = time.perf_counter()
        try:
            result = (_run_tests(args.dry_run, budget, platform) if name == "tests"
                      else _run_stage(name, args.dry_run, budget))
        except subprocess.TimeoutExpired:
            result = {"ok": False, "error": f"ran past its budget of {budget} s"}
        except Exception as e:  # the orchestrator itself must reach the next stage
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["budget_s"] = budget
        if name == "device" and result.get("ok"):
            platform = result["backend"]
            report["device"] = f"{result['device_count']} x {result['device_kind']} ({result['backend']})"
        report["stages"][name] = result
        verdict = "ok" if result.get("ok") else "NOT RUN" if result.get("not_run") else "FAILED"
        print(f"[{name}] {verdict} in {result['seconds']} s"
              + ("" if result.get("ok") else f": {str(result.get('error', result.get('summary')))[:300]}"), flush=True)
        write_json(args.out, report)
    report["ok"] = all(r.get("ok") for r in report["stages"].values())
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
