"""The acceptance run for the first GPU or TPU host: tests, kernel speed, training speed and the phi-1.5 step.

    python -m tools.accelerator_check                                       # on the GPU/TPU host, <= 8 min
    python -m tools.accelerator_check --dry_run --out=/tmp/check.json       # every code path on CPU, tiny shapes

Stages, in order, each in its own subprocess under a time budget; a stage that fails or runs out of time is
recorded and the next one runs. The results file is rewritten (temp file + rename) after every stage.
  device      the device kind, count, versions and spec-sheet peak
  tests       pytest -m accelerator (the kernels compiled and compared with their references)
  attention   forward+backward TFLOP/s at phi-1.5 shapes (S 2048, 32 heads, head_dim 64, bf16, causal), with
              and without segment ids, for every attention implementation this platform runs
  dense       the fused dense kernel against XLA at phi-1.5's layer shapes, forward+backward TFLOP/s
  train_100m  phi-100m, ~30 steps per attention implementation: tokens/s and MFU (phi_jax.flops: 6 x matmul
              parameters + causal attention, against the spec-sheet peak)
  step_phi15  one phi-1.5 train step (FSDP over the host's devices, remat full) at a micro-batch that fits
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tools._bench import add_out_flag, command, write_json

ROOT = Path(__file__).resolve().parents[1]  # the checkout: pytest and the stages run from here
# name -> (budget in seconds on an accelerator, in --dry_run on CPU); 480 s in all.
STAGES = {"device": (30, 60), "tests": (100, 180), "attention": (70, 120), "dense": (45, 90),
          "train_100m": (145, 120), "step_phi15": (90, 90)}


# ------------------------------------------------------------------------------------------------------ stages
def stage_device(dry_run: bool) -> dict:
    import jax

    from phi_jax.flops import peak_flops_per_device

    devices = jax.devices()
    result = {"backend": jax.default_backend(), "device_kind": devices[0].device_kind, "device_count": len(devices),
              "jax": jax.__version__, "python": sys.version.split()[0]}
    for package in ("jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin"):
        with contextlib.suppress(PackageNotFoundError):
            result[package] = version(package)
    try:
        result["peak_flops_per_device"], result["peak_source"] = peak_flops_per_device()
    except ValueError as e:
        result["peak_flops_per_device"], result["peak_error"] = None, str(e)
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "bytes_limit" in stats:
        result["memory_gib_per_device"] = stats["bytes_limit"] / 2**30
    return result


def stage_attention(dry_run: bool) -> dict:
    import jax.numpy as jnp

    from tools._kernel_rows import attention_rows

    b, s, n, h = (1, 256, 2, 64) if dry_run else (4, 2048, 32, 64)
    dtype = jnp.float32 if dry_run else jnp.bfloat16  # fp32 on CPU: bf16 is no faster there and less exact
    warmup, iters = (1, 1) if dry_run else (2, 10)
    return {"rows": attention_rows(b, s, n, h, dtype, warmup, iters, passes=("fwd_bwd",)),
            "flops_convention": "causal: 2*2*B*N*S*S*H/2 forward, x3.5 forward+backward"}


def stage_dense(dry_run: bool) -> dict:
    import jax.numpy as jnp

    from tools._kernel_rows import PHI15_LAYERS, dense_rows

    m, layers = (128, [("fc1 (tiny)", 256, 512, "gelu_new")]) if dry_run else (8192, PHI15_LAYERS)
    dtype = jnp.float32 if dry_run else jnp.bfloat16
    warmup, iters = (1, 1) if dry_run else (2, 10)
    return {"rows": dense_rows([m], dtype, warmup, iters, layers, passes=("fwd_bwd",))}


def stage_train_100m(dry_run: bool) -> dict:
    from phi_jax.config import ATTENTION_IMPLS, Compute
    from phi_jax.flops import flops_per_token, peak_flops_per_device
    from tools._bench import time_steps, train_setup
    from tools._kernel_rows import attention_unavailable

    model, seq, batch, steps, dtype = ("tiny", 64, 2, 2, "float32") if dry_run else ("phi-100m", 2048, 8, 30,
                                                                                    "bfloat16")
    try:
        peak, peak_source = peak_flops_per_device()
    except ValueError as e:
        peak, peak_source = None, str(e)
    if dry_run:
        peak, peak_source = None, "dry run: no peak"
    rows = []
    # The dry run trains with two implementations (and skips cudnn): the same code path at a third of the cost.
    for impl in ("splash", "cudnn", "xla") if dry_run else ATTENTION_IMPLS:
        row = {"model": model, "attention_impl": impl, "seq_len": seq, "batch": batch, "dtype": dtype}
        why_not = attention_unavailable(impl, dtype)
        if why_not:
            rows.append({**row, "skipped": why_not})
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
    return {"rows": rows, "peak_flops_per_device": peak, "peak_source": peak_source}


def stage_step_phi15(dry_run: bool) -> dict:
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
    trainer, state, batch = train_setup(model, seq, rows, compute, mesh, "fsdp")
    step_fn = trainer.train_step
    timing = time_steps(step_fn, state, batch, steps=1)
    result = {"model": model, "mesh": dict(mesh.shape), "micro_batch_per_device": micro, "seq_len": seq,
              "remat": "full", "first_step_sec (compile + run)": timing["compile_sec"],
              "step_sec": timing["step_sec_median"], "tokens_per_sec": rows * seq / timing["step_sec_median"],
              "loss": timing["loss"], "loss_is_finite": bool(np.isfinite(timing["loss"]))}
    stats = devices[0].memory_stats() if not dry_run else None
    if stats and "peak_bytes_in_use" in stats:
        result["peak_gib_device0"] = stats["peak_bytes_in_use"] / 2**30
    return result


STAGE_FUNCTIONS = {"device": stage_device, "attention": stage_attention, "dense": stage_dense,
                   "train_100m": stage_train_100m, "step_phi15": stage_step_phi15}


# ------------------------------------------------------------------------------------------------ orchestration
def _run_tests(dry_run: bool, budget: float, platform: str | None) -> dict:
    """pytest -m accelerator on this host's accelerator. tests/conftest.py defaults JAX to CPU, so the platform is
    named explicitly; --dry_run collects only the kernel tests (they skip on CPU)."""
    env = dict(os.environ)
    if platform and not dry_run:
        env["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(platform, platform)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "accelerator", "-p", "no:cacheprovider"]
    cmd += ["tests/test_flash_attention.py"] if dry_run else []
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
    lines = proc.stdout.strip().splitlines()
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": lines[-1] if lines else "",
            "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:50],
            "ok": proc.returncode == 0}


def _run_stage(name: str, dry_run: bool, budget: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, "-m", "tools.accelerator_check", f"--stage={name}", f"--stage_out={out}",
               *(["--dry_run"] if dry_run else [])]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
        if proc.returncode != 0 or not out.exists():
            return {"ok": False, "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
        return {"ok": True, **json.loads(out.read_text())}


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
        result = STAGE_FUNCTIONS[args.stage](args.dry_run)
        write_json(args.stage_out, result)
        return result

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    report = {"command": command(__file__, argv), "dry_run": args.dry_run,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}
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
        print(f"[{name}] {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s"
              + ("" if result.get("ok") else f": {str(result.get('error', result.get('summary')))[:300]}"), flush=True)
        write_json(args.out, report)
    report["ok"] = all(r.get("ok") for r in report["stages"].values())
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
