"""Which code runs where: what `auto` means on a platform, and how a Pallas kernel runs there.

The platform is always named explicitly: `Compute.resolve(platform)` (phi_jax.config) asks these functions once,
when a model is made, for the platform of the mesh it is built for (phi_jax.trainer: `mesh_platform`, so a step
compiled ahead of time for a TPU topology resolves for TPU) or else JAX's default backend (`default_platform`).
- `resolve_attention_impl`: TPU -> splash, GPU -> cudnn for bf16/fp16 and xla for fp32, CPU -> xla;
- `resolve_dense_impl`: xla everywhere (the fused kernel is one flag away, `pallas`);
- `pallas_target`: the lowering (`gpu` Triton or `tpu` Mosaic) and interpret flag of a Pallas kernel call: the
  platform's own lowering, compiled; on CPU the GPU-style kernel, interpreted (the only way Pallas runs there).
docs/KERNELS.md says why these are the defaults. Each choice is logged once; a choice that cannot run is a
`ValueError`, never a silent fallback.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from phi_jax.config import ATTENTION_CHOICES, ATTENTION_IMPLS, AUTO, DENSE_CHOICES, DENSE_IMPLS, PLATFORMS

log = logging.getLogger("phi_jax")
_LOGGED: set[tuple] = set()
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
LOWERINGS = ("gpu", "tpu")  # Pallas lowerings: Triton, Mosaic


def _platform_name(platform: str) -> str:
    return "gpu" if platform in ("cuda", "rocm") else platform


def default_platform() -> str:
    """'cpu', 'gpu' or 'tpu': JAX's default backend."""
    return _platform_name(jax.default_backend())


def mesh_platform(mesh) -> str:
    """'cpu', 'gpu' or 'tpu': the platform of a mesh's devices (TPU for a topology compiled ahead of time)."""
    return _platform_name(mesh.devices.flat[0].platform)


def _check_platform(platform: str) -> None:
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} is not one of {PLATFORMS}.")


def _log_once(what: str, resolved: str, impl: str, dtype: str | None, platform: str) -> None:
    key = (what, impl, resolved, platform, dtype)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    mode = " (Pallas interpret mode)" if platform == "cpu" and resolved in ("pallas", "splash") else ""
    asked = f"{impl!r}, {dtype} on {platform!r}" if dtype else f"{impl!r} on {platform!r}"
    log.info("%s: %s%s (asked for %s)", what, resolved, mode, asked)


def resolve_attention_impl(impl: str, dtype, platform: str) -> str:
    """The attention implementation `impl` means for inputs of `dtype` on `platform`."""
    _check_platform(platform)
    dtype = jnp.dtype(dtype)
    resolved = impl
    if impl == AUTO:
        resolved = {"tpu": "splash", "gpu": "cudnn" if dtype in _HALF else "xla"}.get(platform, "xla")
    if resolved not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {ATTENTION_CHOICES}.")
    if platform not in ATTENTION_IMPLS[resolved]:
        raise ValueError(f"attention_impl={impl!r} cannot run on {platform!r}: {resolved} runs on "
                         f"{ATTENTION_IMPLS[resolved]}; use 'auto' or 'xla'.")
    if resolved == "cudnn" and dtype not in _HALF:
        raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 inputs, got {dtype}; "
                         "set the model dtype to bfloat16, or use 'auto' (xla for float32) or 'pallas'.")
    _log_once("attention", resolved, impl, dtype.name, platform)
    return resolved


def resolve_dense_impl(impl: str, platform: str) -> str:
    """`auto` is XLA on every platform: the fused Pallas kernel stays off by default until it is measured faster
    than XLA's matmuls on hardware (docs/KERNELS.md)."""
    _check_platform(platform)
    resolved = "xla" if impl == AUTO else impl
    if resolved not in DENSE_IMPLS:
        raise ValueError(f"dense_impl={impl!r} is not one of {DENSE_CHOICES}.")
    _log_once("dense", resolved, impl, None, platform)
    return resolved


def pallas_target(platform: str, backend: str | None = None, interpret: bool | None = None) -> tuple[str, bool]:
    """(lowering, interpret) for a Pallas kernel call that runs on `platform`. backend: 'gpu' (Triton), 'tpu'
    (Mosaic) or None for the platform's own (the GPU-style kernel on CPU); interpret: None means True on CPU and
    False on a GPU/TPU. A lowering compiled for another platform is an error."""
    _check_platform(platform)
    interpret = platform == "cpu" if interpret is None else bool(interpret)
    backend = backend or ("tpu" if platform == "tpu" else "gpu")
    if backend not in LOWERINGS:
        raise ValueError(f"backend={backend!r} is not a Pallas lowering; use None, 'gpu' (Triton) or 'tpu' (Mosaic).")
    if not interpret and backend != platform:
        raise ValueError(f"backend={backend!r} with interpret=False needs a {backend.upper()}, but this computation "
                         f"runs on {platform!r}; pass interpret=True to run it in Pallas interpret mode.")
    return backend, interpret
