"""Benchmark fused_dense against XLA (jnp.dot + bias + gelu_new under jit) at phi-1.5 layer shapes.

On a GPU or TPU: TFLOP/s forward and forward+backward (fused_dense vs XLA) for M = batch*seq in --m and the
four phi-1.5 dense layers; prints a table and writes JSON (command, device kind, jax version, rows).
On CPU: Pallas only runs in interpret mode there, so timings mean nothing; it runs a correctness sweep
(small shapes, both kernel styles, fwd and grads vs dense_reference) instead and says so.

    python tools/bench_dense.py --out bench_dense.json [--m 8192 16384] [--dtype bfloat16] [--iters 20]
"""

import argparse
import functools
import logging
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/_timing.py
from _timing import median_seconds, write_json

from phi_jax.activations import apply_activation
from phi_jax.kernels.dense import BlockSizes, dense_reference, fused_dense

# phi-1.5: d_model 2048, 32 heads, mlp 8192. (name, K, N, activation)
PHI15_LAYERS = [
    ("qkv", 2048, 6144, None),
    ("out_proj", 2048, 2048, None),
    ("fc1", 2048, 8192, "gelu_new"),
    ("fc2", 8192, 2048, None),
]


def xla_dense(x, w, b, activation=None):
    """The unfused baseline the model's `impl='xla'` path runs: one dot_general, then the epilogue in fp32."""
    z = jnp.dot(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    return apply_activation(z, activation).astype(x.dtype)


def _fwd_bwd(f):
    """jit(x, w, b, ct -> dx, dw, db): one forward and one backward pass."""
    return jax.jit(lambda x, w, b, ct: jax.vjp(f, x, w, b)[1](ct))


def _inputs(m, k, n, dtype, seed=0):
    kx, kw, kb, kc = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    b = jax.random.normal(kb, (n,), jnp.float32).astype(dtype)
    ct = jax.random.normal(kc, (m, n), jnp.float32).astype(dtype)
    return x, w, b, ct


def benchmark(ms, dtype, iters, block_sizes):
    rows = []
    for m in ms:
        for name, k, n, act in PHI15_LAYERS:
            x, w, b, ct = _inputs(m, k, n, dtype)
            fused = functools.partial(fused_dense, activation=act, block_sizes=block_sizes, interpret=False)
            xla = jax.jit(functools.partial(xla_dense, activation=act))
            flops = 2 * m * k * n
            y_err = float(jnp.max(jnp.abs(fused(x, w, b).astype(jnp.float32) - xla(x, w, b).astype(jnp.float32))))
            row = dict(layer=name, m=m, k=k, n=n, activation=act, dtype=jnp.dtype(dtype).name, max_abs_diff_fwd=y_err)
            for label, f, mult in [("fused_fwd", jax.jit(fused), 1), ("xla_fwd", xla, 1),
                                   ("fused_fwd_bwd", _fwd_bwd(fused), 3), ("xla_fwd_bwd", _fwd_bwd(xla), 3)]:
                args = (x, w, b, ct) if mult == 3 else (x, w, b)
                sec = median_seconds(f, *args, iters=iters)
                row[f"{label}_ms"] = sec * 1e3
                row[f"{label}_tflops"] = mult * flops / sec / 1e12
            rows.append(row)
            logging.info("%s", row)
    return rows


def correctness_sweep(quick: bool = False):
    """CPU: both kernel styles in interpret mode, small ragged and aligned shapes, fwd + grads vs reference.

    `quick`: float32 and one ragged shape only (seconds instead of minutes)."""
    rows = []
    cases = [((100, 72), 200), ((2, 24, 136), 130), ((64, 256), 256)][: 1 if quick else None]
    styles = {"gpu": BlockSizes(64, 64, 64), "tpu": BlockSizes(32, 128, 128)}
    for dtype in (jnp.float32,) if quick else (jnp.float32, jnp.bfloat16):
        for backend, blocks in styles.items():
            for (shape_x, n) in cases:
                for act in (None, "gelu_new"):
                    x, w, b, ct = _inputs(int(np.prod(shape_x[:-1])), shape_x[-1], n, dtype)
                    x, ct = x.reshape(shape_x), ct.reshape(*shape_x[:-1], n)
                    f = functools.partial(fused_dense, activation=act, block_sizes=blocks, backend=backend,
                                          interpret=True)
                    ref = functools.partial(dense_reference, activation=act)
                    f32 = [a.astype(jnp.float32) for a in (x, w, b)]
                    got = (f(x, w, b), *_fwd_bwd(f)(x, w, b, ct))
                    want = (ref(*f32), *_fwd_bwd(ref)(*f32, ct.astype(jnp.float32)))
                    errs = {name: float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / float(jnp.max(jnp.abs(r))))
                            for name, g, r in zip(("y", "dx", "dw", "db"), got, want, strict=True)}
                    rows.append(dict(backend=backend, dtype=jnp.dtype(dtype).name, x_shape=list(shape_x), n=n,
                                     activation=act, rel_err=errs))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_dense.json")
    parser.add_argument("--m", type=int, nargs="+", default=[8192, 16384], help="batch*seq rows")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--blocks", type=int, nargs=3, metavar=("BM", "BN", "BK"), default=None)
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--num-stages", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = jax.devices()[0]
    meta = dict(command=" ".join([sys.executable, *sys.argv]), device_kind=device.device_kind,
                platform=jax.default_backend(), jax_version=jax.__version__, python=platform.python_version())
    if jax.default_backend() == "cpu":
        print("CPU backend: Pallas runs only in interpret mode here, so no timings; running a correctness sweep.")
        rows = correctness_sweep()
        print(f"{'style':5} {'dtype':9} {'x shape':12} {'N':>4} {'act':9} {'y':>9} {'dx':>9} {'dw':>9} {'db':>9}")
        for r in rows:
            e = r["rel_err"]
            print(f"{r['backend']:5} {r['dtype']:9} {r['x_shape']!s:12} {r['n']:>4} {r['activation']!s:9} "
                  f"{e['y']:9.2e} {e['dx']:9.2e} {e['dw']:9.2e} {e['db']:9.2e}")
        result = dict(meta, mode="cpu_correctness_sweep", rows=rows)
    else:
        blocks = None
        if args.blocks:
            blocks = BlockSizes(*args.blocks, num_warps=args.num_warps, num_stages=args.num_stages)
        rows = benchmark(args.m, jnp.dtype(args.dtype), args.iters, blocks)
        print(f"{device.device_kind}, {args.dtype}, TFLOP/s (fwd+bwd counts 3x the forward FLOPs)")
        print(f"{'layer':9} {'M':>6} {'K':>5} {'N':>5} {'fused fwd':>10} {'xla fwd':>8} {'fused f+b':>10} "
              f"{'xla f+b':>8}")
        for r in rows:
            print(f"{r['layer']:9} {r['m']:>6} {r['k']:>5} {r['n']:>5} {r['fused_fwd_tflops']:>10.1f} "
                  f"{r['xla_fwd_tflops']:>8.1f} {r['fused_fwd_bwd_tflops']:>10.1f} {r['xla_fwd_bwd_tflops']:>8.1f}")
        result = dict(meta, mode="benchmark", dtype=args.dtype, block_sizes=args.blocks, rows=rows)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
