"""Model FLOPs per token and the hardware peak they are measured against (for MFU)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from phi_jax.config import PhiConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def flops_per_token(cfg: PhiConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + causal attention.

    Every parameter except the input embedding (a lookup, not a matmul) costs 2 FLOPs forward and 4 backward.
    Attention scores and the weighted sum cost 2 x 2 x seq x hidden per layer forward at full context; causal
    masking halves it on average, and the backward pass doubles it again: 6 x layers x seq x hidden.
    phi-1.5 at 2048: 7.88 + 0.60 = 8.48 GFLOP per token.
    """
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    return 6.0 * matmul_params + 6.0 * cfg.num_layers * seq_len * cfg.hidden_size


def matmul_flops_per_sec(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of a jitted float32 [m, k] @ [k, n] matmul on this process's default device."""
    x, w = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(x, w).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        f(x, w).block_until_ready()
        runs += 1
    return 2 * m * k * n * runs / (time.perf_counter() - start)


def measured_matmul_peak(n: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a jitted float32 n x n matmul: the ceiling CPU MFU is measured against."""
    return matmul_flops_per_sec(n, n, n, seconds)


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if override > 0:
        return override, "config"
    kind = jax.devices()[0].device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"spec sheet ({kind})"
    if jax.default_backend() == "cpu":
        return measured_matmul_peak() / jax.local_device_count(), "measured float32 matmul"
    raise ValueError(f"Unknown accelerator {kind!r}: set --config.peak_flops_per_device to its peak FLOP/s.")
