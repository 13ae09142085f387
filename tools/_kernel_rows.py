"""What tools/bench_kernels.py and tools/accelerator_check.py share: attention and dense kernel rows at phi-1.5
shapes, each implementation timed beside XLA's (forward and forward+backward TFLOP/s, and its difference from XLA)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.activations import gelu_new
from phi_jax.config import ATTENTION_IMPLS
from tools._bench import fwd_bwd, median_seconds

ATTENTION_FWD_BWD, DENSE_FWD_BWD = 3.5, 3  # forward+backward FLOPs / forward FLOPs
# phi-1.5: d_model 2048, mlp 8192. (layer, K, N, activation)
PHI15_LAYERS = (("qkv", 2048, 6144, None), ("out_proj", 2048, 2048, None), ("fc1", 2048, 8192, "gelu_new"),
                ("fc2", 8192, 2048, None))


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def _timed(f, args: tuple, ct, flops: float, bwd_factor: float, passes, warmup: int, iters: int) -> dict:
    """{PASS_ms, PASS_tflops} for each of `passes`: fwd is jit(f)(*args) at `flops`; fwd_bwd is f and its vjp of
    `ct`, counted as `bwd_factor` times the forward's FLOPs."""
    out = {}
    for name in passes:
        run, run_args, n = ((jax.jit(f), args, flops) if name == "fwd" else
                            (fwd_bwd(f), (*args, ct), flops * bwd_factor))
        sec = median_seconds(run, *run_args, warmup=warmup, iters=iters)
        out[f"{name}_ms"], out[f"{name}_tflops"] = sec * 1e3, n / sec / 1e12
    return out


# ------------------------------------------------------------------------------------------------------ attention
def causal_attention_flops(batch: int, seq: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention: two S x S x H matmuls, half of them masked. Forward+backward counts 3.5x
    this (ATTENTION_FWD_BWD): the backward's five matmuls against the forward's two (FA-2 convention)."""
    return 2 * 2 * batch * heads * seq * seq * head_dim / 2


def attention_unavailable(impl: str, dtype) -> str | None:
    """None if attention `impl` runs here, else why not (phi_jax.attention's own check)."""
    from phi_jax.dispatch import default_platform, resolve_attention_impl

    try:
        resolve_attention_impl(impl, dtype, default_platform())
    except ValueError as e:
        return str(e)
    return None


def attention_rows(batch: int, seq: int, heads: int, head_dim: int, dtype, warmup: int, iters: int,
                   passes: tuple[str, ...] = ("fwd", "fwd_bwd"), on_row=None) -> list[dict]:
    """One row per (implementation, with or without segment ids); `passes`: which of fwd, fwd_bwd to time.
    `on_row(rows)` is called with the rows so far after each one (to save them as they come)."""
    from phi_jax.attention import attention

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, (batch, seq, heads, head_dim), jnp.float32).astype(dtype) for kk in keys)
    segments = jnp.where(jnp.arange(seq) < seq // 3, 1, 2)[None].repeat(batch, 0).astype(jnp.int32)  # 2 documents
    flops = causal_attention_flops(batch, seq, heads, head_dim)
    rows, reference = [], {}
    for packed in (False, True):
        seg = segments if packed else None
        for impl in ("xla", *[i for i in ATTENTION_IMPLS if i != "xla"]):  # xla first: the reference output
            row = {"impl": impl, "segment_ids": packed, "shape": f"{batch}x{seq}x{heads}x{head_dim}",
                   "dtype": jnp.dtype(dtype).name}
            why_not = attention_unavailable(impl, dtype)
            if why_not:
                rows.append({**row, "skipped": why_not})
                if on_row:
                    on_row(rows)
                continue
            attn = lambda q, k, v, impl=impl, seg=seg: attention(q, k, v, segment_ids=seg, impl=impl)
            try:
                out = jax.jit(attn)(q, k, v).astype(jnp.float32)
                reference.setdefault(packed, out)
                row["max_abs_diff_vs_xla"] = float(jnp.max(jnp.abs(out - reference[packed])))
                row.update(_timed(attn, (q, k, v), ct, flops, ATTENTION_FWD_BWD, passes, warmup, iters))
            except Exception as e:  # one implementation failing must not hide the others' figures
                row["error"] = _error(e)
            rows.append(row)
            print(row, flush=True)
            if on_row:
                on_row(rows)
    return rows


# ---------------------------------------------------------------------------------------------------------- dense
def xla_dense(x, w, b, activation=None):
    """The unfused baseline (the model's `dense_impl=xla`): one dot_general, then bias and activation in fp32."""
    z = jnp.dot(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    return (gelu_new(z) if activation == "gelu_new" else z).astype(x.dtype)


def dense_inputs(m: int, k: int, n: int, dtype, seed: int = 0):
    """x [m, k], w [k, n] (scaled by 1/sqrt(k)), b [n] and a cotangent [m, n], all in `dtype`."""
    kx, kw, kb, kc = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    b = jax.random.normal(kb, (n,), jnp.float32).astype(dtype)
    ct = jax.random.normal(kc, (m, n), jnp.float32).astype(dtype)
    return x, w, b, ct


def dense_rows(ms, dtype, warmup: int, iters: int, layers=PHI15_LAYERS, block_sizes=None,
               passes: tuple[str, ...] = ("fwd", "fwd_bwd"), on_row=None) -> list[dict]:
    """One row per (M, layer): fused_dense and XLA, TFLOP/s for each of `passes` (fwd+bwd counts 3x the forward).
    `on_row(rows)` is called with the rows so far after each one."""
    from phi_jax.kernels.dense import fused_dense

    rows = []
    for m in ms:
        for name, k, n, act in layers:
            x, w, b, ct = dense_inputs(m, k, n, dtype)
            row = {"layer": name, "m": m, "k": k, "n": n, "activation": act, "dtype": jnp.dtype(dtype).name}
            impls = {"xla": functools.partial(xla_dense, activation=act),  # first: the reference output
                     "fused": functools.partial(fused_dense, activation=act, block_sizes=block_sizes)}
            for label, f in impls.items():
                try:
                    out = jax.jit(f)(x, w, b).astype(jnp.float32)
                    if label == "xla":
                        reference = out
                    else:
                        row[f"{label}_max_abs_diff_vs_xla"] = float(jnp.max(jnp.abs(out - reference)))
                    figures = _timed(f, (x, w, b), ct, 2 * m * k * n, DENSE_FWD_BWD, passes, warmup, iters)
                    row.update({f"{label}_{key}": value for key, value in figures.items()})
                except Exception as e:
                    row[f"{label}_error"] = _error(e)
            rows.append(row)
            print(row, flush=True)
            if on_row:
                on_row(rows)
    return rows
