"""The acceptance run for the first GPU or TPU host: tests, kernel speed, training speed and the phi-1.5 step.

    python tools/accelerator_check.py --out=accelerator_check.json          # on the GPU/TPU host, <= 8 min
    python tools/accelerator_check.py --dry_run --out=/tmp/check.json       # every code path on CPU, tiny shapes

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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from _timing import median_seconds, write_json  # noqa: E402

# name -> (budget in seconds on an accelerator, in --dry_run on CPU); 480 s in all.
STAGES = {"device": (30, 60), "tests": (100, 180), "attention": (70, 120), "dense": (45, 90),
          "train_100m": (145, 120), "step_phi15": (90, 90)}
ATTENTION_IMPLS = ("pallas", "splash", "cudnn", "xla")


def _platform() -> str:
    import jax

    return jax.default_backend()


def _available(impl: str, dtype) -> str | None:
    """None if `impl` runs here, else why not (phi_jax.attention's own check)."""
    from phi_jax.attention import resolve_attention_impl

    try:
        resolve_attention_impl(impl, dtype)
    except ValueError as e:
        return str(e)
    return None


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
    import jax
    import jax.numpy as jnp
    from bench_kernels import _fwd_bwd, causal_attention_flops

    from phi_jax.attention import attention

    b, s, n, h = (1, 256, 2, 64) if dry_run else (4, 2048, 32, 64)
    dtype = jnp.float32 if dry_run else jnp.bfloat16  # fp32 on CPU: bf16 is no faster there and less exact
    warmup, iters = (1, 1) if dry_run else (2, 10)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, (b, s, n, h), jnp.float32).astype(dtype) for kk in keys)
    segments = jnp.where(jnp.arange(s) < s // 3, 1, 2)[None].repeat(b, 0).astype(jnp.int32)  # two documents
    flops = causal_attention_flops(b, s, n, h)[1]
    rows, reference = [], {}
    for packed in (False, True):
        seg = segments if packed else None
        for impl in ("xla", *[i for i in ATTENTION_IMPLS if i != "xla"]):  # xla first: the reference output
            row = {"impl": impl, "segment_ids": packed, "shape": f"{b}x{s}x{n}x{h}", "dtype": jnp.dtype(dtype).name}
            why_not = _available(impl, dtype)
            if why_not:
                rows.append({**row, "skipped": why_not})
                continue
            attn = lambda q, k, v, impl=impl, seg=seg: attention(q, k, v, segment_ids=seg, impl=impl)
            try:
                out = jax.jit(attn)(q, k, v)
                reference.setdefault(packed, out)
                row["max_abs_diff_vs_xla"] = float(jnp.max(jnp.abs(out.astype(jnp.float32)
                                                                   - reference[packed].astype(jnp.float32))))
                sec = median_seconds(_fwd_bwd(attn), q, k, v, ct, warmup=warmup, iters=iters)
                row.update(fwd_bwd_ms=sec * 1e3, fwd_bwd_tflops=flops / sec / 1e12)
            except Exception as e:  # one implementation failing must not hide the others' figures
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            rows.append(row)
            print(row, flush=True)
    return {"rows": rows, "flops_convention": "causal: 2*2*B*N*S*S*H/2 forward, x3.5 forward+backward"}


def stage_dense(dry_run: bool) -> dict:
    import functools

    import jax.numpy as jnp
    from bench_dense import PHI15_LAYERS, _fwd_bwd, _inputs, xla_dense

    from phi_jax.kernels.dense import fused_dense

    m, layers = (128, [("fc1 (tiny)", 256, 512, "gelu_new")]) if dry_run else (8192, PHI15_LAYERS)
    dtype = jnp.float32 if dry_run else jnp.bfloat16
    warmup, iters = (1, 1) if dry_run else (2, 10)
    rows = []
    for name, k, n, act in layers:
        x, w, b, ct = _inputs(m, k, n, dtype)
        row = {"layer": name, "m": m, "k": k, "n": n, "activation": act, "dtype": jnp.dtype(dtype).name}
        for label, f in (("fused", functools.partial(fused_dense, activation=act)),
                         ("xla", functools.partial(xla_dense, activation=act))):
            try:
                sec = median_seconds(_fwd_bwd(f), x, w, b, ct, warmup=warmup, iters=iters)
                row[f"{label}_fwd_bwd_ms"], row[f"{label}_fwd_bwd_tflops"] = sec * 1e3, 3 * 2 * m * k * n / sec / 1e12
            except Exception as e:
                row[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rows.append(row)
        print(row, flush=True)
    return {"rows": rows}


def stage_train_100m(dry_run: bool) -> dict:
    import jax
    import numpy as np
    from bench_train import setup

    from phi_jax.flops import flops_per_token, peak_flops_per_device

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
        why_not = _available(impl, dtype)
        if why_not:
            rows.append({**row, "skipped": why_not})
            continue
        try:
            cfg, step_fn, state, b = setup(model, seq, batch, dtype, "none", attention_impl=impl)
            start = time.perf_counter()
            state, metrics = step_fn(state, b)
            jax.block_until_ready(metrics)
            row["compile_sec"] = time.perf_counter() - start
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                state, metrics = step_fn(state, b)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
            tps = batch * seq / float(np.median(times))
            row.update(steps=steps, step_sec_median=float(np.median(times)), tokens_per_sec=tps,
                       loss=float(metrics["loss"]), mfu=tps * flops_per_token(cfg, seq) / peak if peak else None)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rows.append(row)
        print(row, flush=True)
    return {"rows": rows, "peak_flops_per_device": peak, "peak_source": peak_source}


def stage_step_phi15(dry_run: bool) -> dict:
    import jax
    import numpy as np

    from phi_jax.config import Compute, PhiConfig
    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import batch_sharding, make_mesh, strategy_rules
    from phi_jax.train_state import create_train_state, state_shardings
    from phi_jax.train_step import jit_steps

    devices = jax.devices()
    memory = (devices[0].memory_stats() or {}).get("bytes_limit", 0) / 2**30 if not dry_run else 0
    # FSDP over this host's devices. Micro-batch per device: 2 fits a v5e chip (16 GiB) with 8 chips (measured
    # by the TPU compiler, docs/PERFORMANCE.md); 4 on 40+ GiB devices, where one device holds the whole 17 GiB
    # state plus remat-full activations.
    model, seq, micro = ("tiny", 64, 1) if dry_run else ("phi-1.5", 2048, 4 if memory >= 40 else 2)
    cfg, compute = PhiConfig.preset(model), Compute(dtype="float32" if dry_run else "bfloat16", remat="full")
    mesh = make_mesh(1, -1, 1, devices=devices[:1] if dry_run else devices)
    rules, opt_rules = strategy_rules("fsdp")
    tx = make_optimizer(2e-4)
    state = create_train_state(cfg, tx, mesh, rules=rules, opt_rules=opt_rules, compute=compute)
    _, shardings = state_shardings(cfg, tx, mesh, rules, opt_rules, compute=compute)
    step_fn, _ = jit_steps(mesh, shardings, rules)
    rows = micro * mesh.shape["fsdp"]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, rows, seq + 1), dtype=np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
             "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, rows, seq)).copy(),
             "segment_ids": np.ones((1, rows, seq), np.int32), "loss_mask": np.ones((1, rows, seq), np.float32)}
    batch = jax.device_put(batch, batch_sharding(mesh, leading_dims=1))
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    step = time.perf_counter() - start
    result = {"model": model, "mesh": dict(mesh.shape), "micro_batch_per_device": micro, "seq_len": seq,
              "remat": "full", "first_step_sec (compile + run)": first, "step_sec": step,
              "tokens_per_sec": rows * seq / step, "loss": float(metrics["loss"]),
              "loss_is_finite": bool(np.isfinite(float(metrics["loss"])))}
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
        cmd = [sys.executable, __file__, f"--stage={name}", f"--stage_out={out}"] + (["--dry_run"] if dry_run else [])
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
        if proc.returncode != 0 or not out.exists():
            return {"ok": False, "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
        return {"ok": True, **json.loads(out.read_text())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=False, default="accelerator_check.json")
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
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "dry_run": args.dry_run,
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
