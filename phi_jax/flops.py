"""Model FLOPs per token and the hardware peak they are measured against (for MFU)."""

from __future__ import annotations

import os

import jax

from phi_jax.config import PhiConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity), by a substring of the device kind.
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}
# A CPU has no spec-sheet entry: MFU on CPU is reported against a nominal 64 float32 FLOPs per cycle per core (two
# 16-lane AVX-512 FMA units) at 3 GHz, an upper bound for x86 server cores, so CPU MFU never reads above 100%. The
# machine's real matmul ceiling is what tools/bench_train.py measures beside it.
CPU_NOMINAL_FLOPS_PER_CORE = 192e9


def flops_per_token(cfg: PhiConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + causal attention.

    Every parameter except the input embedding (a lookup, not a matmul) costs 2 FLOPs forward and 4 backward.
    Attention scores and the weighted sum cost 2 x 2 x seq x hidden per layer forward at full context; causal
    masking halves it on average, and the backward pass doubles it again: 6 x layers x seq x hidden.
    phi-1.5 at 2048: 7.88 + 0.60 = 8.48 GFLOP per token.
    """
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    return 6.0 * matmul_params + 6.0 * cfg.num_layers * seq_len * cfg.hidden_size


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from): the override, the spec sheet of a known
    accelerator, or on CPU the nominal per-core figure times the cores this process may use."""
    if override > 0:
        return override, "config"
    kind = jax.devices()[0].device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"spec sheet ({kind})"
    if jax.default_backend() == "cpu":
        cores = len(os.sched_getaffinity(0))
        return (CPU_NOMINAL_FLOPS_PER_CORE * cores / jax.local_device_count(),
                f"nominal CPU figure: {CPU_NOMINAL_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per core x {cores} cores")
    raise ValueError(f"Unknown accelerator {kind!r}: set --config.peak_flops_per_device to its peak FLOP/s.")
