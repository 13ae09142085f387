"""Benchmark phi_jax's Pallas kernels; one function per kernel, chosen with --kernels.

    python tools/bench_kernels.py --kernels attention --batch 8 --out bench_kernels.json

On a GPU/TPU each kernel is timed (warmup, then the median of --iters runs, each ended by block_until_ready) at
phi-1.5 shapes and reported as TFLOP/s next to XLA (and cuDNN on GPU). On CPU, where Pallas only interprets, it
runs a correctness sweep instead (small shapes, max |error| against the reference) and says so. Results go to a
JSON file holding the command line, device kind and jax version, and a table is printed.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # import this checkout's phi_jax
sys.path.insert(0, str(Path(__file__).resolve().parent))  # and the tools' own helpers

from _timing import median_seconds, write_json

from phi_jax.attention import xla_attention
from phi_jax.attention_mask import causal_segment_mask
from phi_jax.kernels.flash_attention import flash_attention


def _fwd_bwd(attn: Callable) -> Callable:
    def run(q, k, v, ct):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(ct)
    return jax.jit(run)


# ------------------------------------------------------------------------------------------------------ attention
def causal_attention_flops(batch: int, seq: int, heads: int, head_dim: int) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of causal attention: two S x S x H matmuls, half of them masked;
    the backward counts 2.5x the forward (five matmuls against two, FA-2 convention)."""
    fwd = 2 * 2 * batch * heads * seq * seq * head_dim / 2
    return fwd, fwd * 3.5


def _attention_sweep() -> list[dict]:
    """CPU: max |error| of the interpreted kernels against xla_attention (fp32), forward and grads."""
    rows = []
    for backend in ("gpu", "tpu"):
        for causal, packed, seq in ((True, False, 128), (True, True, 100), (False, True, 100)):
            keys = jax.random.split(jax.random.key(0), 5)
            q, k, v, ct = (jax.random.normal(kk, (1, seq, 2, 64), jnp.float32) for kk in keys[:4])
            seg = jnp.cumsum(jax.random.bernoulli(keys[4], 0.05, (1, seq)), axis=1) if packed else None
            kernel = functools.partial(flash_attention, segment_ids=seg, causal=causal, backend=backend,
                                       interpret=True)
            ref = functools.partial(xla_attention, mask=causal_segment_mask(seg, seq, causal=causal))
            (o, g), (ro, rg) = _fwd_bwd(kernel)(q, k, v, ct), _fwd_bwd(ref)(q, k, v, ct)
            rows.append({"impl": f"pallas-{backend} (interpret)", "seq": seq, "causal": causal, "segments": packed,
                         "max_abs_err_fwd": float(jnp.max(jnp.abs(o - ro))),
                         "max_abs_err_bwd": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g, rg, strict=True))})
    return rows


def bench_attention(args: argparse.Namespace) -> list[dict]:
    platform = jax.default_backend()
    if platform == "cpu":
        print("attention: CPU backend, Pallas runs only in interpret mode -> correctness sweep, no timings.")
        return _attention_sweep()
    b, s, n, h = args.batch, args.seq, args.heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, (b, s, n, h), jnp.float32).astype(dtype) for kk in keys)
    impls = {"pallas": functools.partial(flash_attention, causal=True),
             "xla": functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla")}
    if platform == "gpu":
        impls["cudnn"] = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
    flops_fwd, flops_fwd_bwd = causal_attention_flops(b, s, n, h)
    rows = []
    for name, attn in impls.items():
        row = {"impl": name, "shape": f"{b}x{s}x{n}x{h}", "dtype": dtype.name}
        try:
            t_fwd = median_seconds(jax.jit(attn), q, k, v, warmup=args.warmup, iters=args.iters)
            t_all = median_seconds(_fwd_bwd(attn), q, k, v, ct, warmup=args.warmup, iters=args.iters)
        except Exception as e:  # report an implementation that cannot run here instead of aborting the table
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        else:
            row.update(fwd_ms=t_fwd * 1e3, fwd_tflops=flops_fwd / t_fwd / 1e12,
                       fwd_bwd_ms=t_all * 1e3, fwd_bwd_tflops=flops_fwd_bwd / t_all / 1e12)
        rows.append(row)
    return rows


def bench_dense(args: argparse.Namespace) -> list[dict]:
    """The fused dense kernel at phi-1.5's four layer shapes (tools/bench_dense.py; CPU: a quick correctness sweep)."""
    import bench_dense as dense

    if jax.default_backend() == "cpu":
        print("CPU backend: the fused dense kernel runs in interpret mode only; correctness sweep, no timings.")
        rows = dense.correctness_sweep(quick=True)
        return [{**{k: v for k, v in r.items() if k != "rel_err"}, **{f"rel_err_{k}": v for k, v in
                                                                     r["rel_err"].items()}} for r in rows]
    return dense.benchmark([args.batch * args.seq], jnp.dtype(args.dtype), args.iters, None)


# Kernel name -> benchmark function (args -> list of result rows).
KERNELS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {"attention": bench_attention, "dense": bench_dense}


def _print_table(name: str, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print(f"\n== {name} ==")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="attention,dense", help=f"comma-separated, from: {','.join(KERNELS)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="bench_kernels.json")
    args = p.parse_args(argv)
    names = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = [k for k in names if k not in KERNELS]
    if unknown:
        p.error(f"unknown kernels {unknown}; available: {sorted(KERNELS)}")
    report = {"command": " ".join([sys.executable, *sys.argv]), "backend": jax.default_backend(),
              "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__, "results": {}}
    for name in names:
        report["results"][name] = rows = KERNELS[name](args)
        _print_table(name, rows)
    write_json(args.out, report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
