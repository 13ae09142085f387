"""Model FLOPs per token and the hardware peak they are measured against (for MFU)."""

from __future__ import annotations

import logging
import os

import jax

from phi_jax.config import PhiConfig

log = logging.getLogger("phi_jax")

# Dense bf16 peak FLOP/s per device (no 2:4 sparsity), keyed by the device kind JAX reports, lower-cased, without
# "NVIDIA ". A key matches a kind that equals it or starts with it followed by a space or "-" ("h100" matches
# "NVIDIA H100 80GB HBM3"), and longer keys are tried first, so "tpu v5 lite" is v5e while "tpu v5" alone is v5p,
# "h100 pcie" is not the SXM part, and "a10" never matches "A100" or "A10G".
PEAK_FLOPS = {
    # Google Cloud TPU docs, "TPU versions" / system architecture pages, peak bf16 compute per chip:
    "tpu v4": 275e12,       # v4: 275 TFLOPS
    "tpu v5 lite": 197e12,  # v5e: 197 TFLOPS
    "tpu v5": 459e12,       # v5p: 459 TFLOPS (its device kind is "TPU v5")
    "tpu v6 lite": 918e12,  # v6e (Trillium): 918 TFLOPS
    "tpu7x": 2307e12,       # v7x (Ironwood): 2,307 TFLOPS (4,614 FP8)
    # NVIDIA spec sheets, BF16 Tensor Core, half the "with sparsity" figure:
    "a100": 312e12,         # A100 datasheet (SXM and PCIe, 40 and 80 GB): 312 TFLOPS
    "h100": 989e12,         # H100 datasheet, SXM: 1,979 with sparsity
    "h100 pcie": 756e12,    # H100 datasheet, PCIe: 1,513 with sparsity
    "h100 nvl": 835e12,     # H100 datasheet, NVL: 1,671 with sparsity
    "h200": 989e12,         # H200 datasheet, SXM: 1,979 with sparsity
    "h800": 989e12,         # H800 SXM product brief: 1,979 with sparsity
    "b200": 2250e12,        # HGX B200 datasheet: 36 PFLOPS with sparsity for 8 GPUs, 4.5 per GPU
    "l4": 121e12,           # L4 datasheet: 242 with sparsity
    "l40s": 362e12,         # L40S datasheet: 733 with sparsity
    "a10": 125e12,          # A10 datasheet: 250 with sparsity
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


def spec_sheet_peak(device_kind: str) -> float | None:
    """The PEAK_FLOPS figure of `device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...); None if unknown."""
    kind = device_kind.lower().removeprefix("nvidia ").strip()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind == key or kind.startswith((key + " ", key + "-")):
            return PEAK_FLOPS[key]
    return None


def peak_flops_per_device(override: float = 0.0) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from): the override, the spec sheet of a known
    accelerator, or on CPU the nominal per-core figure times the cores this process may use. An accelerator with
    no spec-sheet entry gives (None, why) and one warning: the run goes on without an MFU figure."""
    if override > 0:
        return override, "config"
    device_kind = jax.devices()[0].device_kind
    peak = spec_sheet_peak(device_kind)
    if peak is not None:
        return peak, f"spec sheet ({device_kind})"
    if jax.default_backend() == "cpu":
        cores = len(os.sched_getaffinity(0))
        return (CPU_NOMINAL_FLOPS_PER_CORE * cores / jax.local_device_count(),
                f"nominal CPU figure: {CPU_NOMINAL_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per core x {cores} cores")
    why = (f"no spec-sheet peak for accelerator {device_kind!r}: MFU is not reported; set "
           "--config.peak_flops_per_device to its dense bf16 peak FLOP/s to have it")
    log.warning("%s", why)
    return None, why
