"""What the benchmarks share: timing, the record of the command and machine, result tables and files."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path


def add_out_flag(parser, tool_file: str) -> None:
    """--out: the JSON results file every tools/ script writes (default bench_results/<tool>.json)."""
    parser.add_argument("--out", default=f"bench_results/{Path(tool_file).stem}.json", help="the JSON results file")


def preset_list(parser, text: str) -> list[str]:
    """--preset=A,B: named architectures (phi_jax.config.PRESETS); an unknown name is a usage error."""
    from phi_jax.config import PRESETS

    names = [n.strip() for n in text.split(",") if n.strip()]
    if unknown := [n for n in names if n not in PRESETS]:
        parser.error(f"--preset: unknown {unknown}; choose from {sorted(PRESETS)}")
    return names


def median_seconds(fn, *args, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of `fn(*args)` over `iters` calls, after `warmup` calls (the first compiles); each
    call is ended by block_until_ready, so asynchronous dispatch is not mistaken for speed."""
    import jax  # here, not at the top: tools such as plan_memory configure JAX before importing it

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_bwd(f):
    """jit of (*args, ct) -> (f(*args), grads of <f(*args), ct> in args): one forward and one backward pass."""
    import jax

    def run(*args):
        out, vjp = jax.vjp(f, *args[:-1])
        return out, vjp(args[-1])

    return jax.jit(run)


def command(tool_file: str, argv: list[str] | None = None) -> str:
    """The command line of a tool run as `python -m tools.NAME` (`tool_file`: its __file__)."""
    return " ".join(["python", "-m", f"tools.{Path(tool_file).stem}", *(sys.argv[1:] if argv is None else argv)])


def machine() -> dict:
    """The host a figure was measured on (the load average: whether other work shared it)."""
    return {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0]}


def device() -> dict:
    """The JAX backend, its first device's kind and count, and the jax version."""
    import jax

    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": len(jax.devices()), "jax": jax.__version__}


def print_table(title: str, rows: list[dict]) -> None:
    """Rows as aligned columns (the union of their keys, in first-seen order)."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print(f"\n== {title} ==")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def write_json(path: str, result: dict) -> None:
    """Writes `result` to `path` through a temporary file and a rename: never a half-written results file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


def synthetic_batch(vocab_size: int, rows: int, seq_len: int) -> dict:
    """One optimizer step's batch of random tokens (one micro-batch of `rows` unpacked sequences), as numpy."""
    import numpy as np

    tokens = np.random.default_rng(0).integers(0, vocab_size, (1, rows, seq_len + 1), dtype=np.int32)
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (1, rows, seq_len)).copy(),
            "segment_ids": np.ones((1, rows, seq_len), np.int32), "loss_mask": np.ones((1, rows, seq_len), np.float32)}


def train_setup(preset: str, seq_len: int, rows: int, compute, mesh=None, sharding: str = "fsdp"):
    """(trainer, fresh state, synthetic batch of `rows` sequences) for a preset; one device unless `mesh`."""
    import jax

    from phi_jax.config import PhiConfig
    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import make_mesh
    from phi_jax.trainer import build_trainer

    cfg = PhiConfig.preset(preset)
    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    trainer = build_trainer(cfg, compute, make_optimizer(1e-4), mesh, sharding)
    batch = jax.device_put(synthetic_batch(cfg.vocab_size, rows, seq_len), trainer.batch_sharding)
    return trainer, trainer.init_state(0), batch


def time_steps(step_fn, state, batch, steps: int) -> dict:
    """One untimed-for-speed first step (compile + run), then `steps` timed ones, each ended by
    block_until_ready: their median and minimum seconds, the last loss, and host memory's cost per timed step
    (page faults and kernel time, phi_jax/host_memory.py)."""
    import jax
    import numpy as np

    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    first_step_sec = time.perf_counter() - start
    times = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"compile_sec": round(first_step_sec, 2), "steps": steps, "step_sec_median": float(np.median(times)),
            "step_sec_min": min(times), "loss": float(metrics["loss"]),
            "page_faults_per_step": (after.ru_minflt - usage.ru_minflt) / steps,
            "system_sec_per_step": (after.ru_stime - usage.ru_stime) / steps}


def matmul_flops_per_sec(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of a jitted float32 [m, k] @ [k, n] matmul on this process's default device, run for `seconds`."""
    import jax
    import jax.numpy as jnp

    x, w = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(x, w).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        f(x, w).block_until_ready()
        runs += 1
    return 2 * m * k * n * runs / (time.perf_counter() - start)
