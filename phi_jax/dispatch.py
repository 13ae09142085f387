"""Which code runs where: what `auto` means on a platform, and how a Pallas kernel runs there.

The platform is always named explicitly: `Compute.resolve(platform)` (phi_jax.config) asks these functions once,
when a model is made, for the platform of the mesh it is built for (phi_jax.trainer: `mesh_platform`, so a step
compiled ahead of time for a TPU topology resolves for TPU) or else JAX's default backend (`default_platform`).
- `resolve_attention_impl`: TPU -> splash, GPU -> cudnn for bf16/fp16 on compute capability 8.0 or newer (cuDNN's
  flash attention needs Ampere) and xla for fp32 or an older GPU, CPU -> xla;
- `attention_for_call`: what runs one call whose shapes cuDNN cannot train (packed rows at an odd length, an
  unsupported head size): `auto`'s fallback (xla), logged with the reason; an explicit `cudnn` is a ValueError;
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
CUDNN_MIN_CAPABILITY = (8, 0)  # cuDNN's fused flash attention: Ampere or newer


def _platform_name(platform: str) -> str:
    return "gpu" if platform in ("cuda", "rocm") else platform


def default_platform() -> str:
    """'cpu', 'gpu' or 'tpu': JAX's default backend."""
    return _platform_name(jax.default_backend())


def mesh_platform(mesh) -> str:
    """'cpu', 'gpu' or 'tpu': the platform of a mesh's devices (TPU for a topology compiled ahead of time)."""
    return _platform_name(mesh.devices.flat[0].platform)


def device_capability(device) -> tuple[int, int] | None:
    """A CUDA device's compute capability, (9, 0) for an H100; None for other devices (also compile-only GPUs
    described by phi_jax.gpu_targets carry it)."""
    found = getattr(device, "compute_capability", None)
    if not found:
        return None
    major, _, minor = str(found).partition(".")
    return int(major), int(minor or 0)


def gpu_capability() -> tuple[int, int] | None:
    """The compute capability of JAX's first device when its default backend is a GPU; None otherwise."""
    return device_capability(jax.devices()[0]) if default_platform() == "gpu" else None


def _check_platform(platform: str) -> None:
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} is not one of {PLATFORMS}.")


def _log_once(what: str, resolved: str, impl: str, dtype: str | None, platform: str, why: str = "") -> None:
    key = (what, impl, resolved, platform, dtype, why)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    mode = " (Pallas interpret mode)" if platform == "cpu" and resolved in ("pallas", "splash") else ""
    asked = f"{impl!r}, {dtype} on {platform!r}" if dtype else f"{impl!r} on {platform!r}"
    log.info("%s: %s%s (asked for %s)%s", what, resolved, mode, asked, f": {why}" if why else "")


def _capability_text(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def resolve_attention_impl(impl: str, dtype, platform: str, capability: tuple[int, int] | None = None) -> str:
    """The attention implementation `impl` means for inputs of `dtype` on `platform`. `capability`: the GPU's
    compute capability (None: that of JAX's default GPU, `gpu_capability`, or unknown off a GPU)."""
    _check_platform(platform)
    dtype = jnp.dtype(dtype)
    if platform == "gpu" and capability is None:
        capability = gpu_capability()
    old_gpu = platform == "gpu" and capability is not None and capability < CUDNN_MIN_CAPABILITY
    old_why = (f"compute capability {_capability_text(capability)} is below the "
               f"{_capability_text(CUDNN_MIN_CAPABILITY)} cuDNN flash attention needs") if old_gpu else ""
    resolved = impl
    if impl == AUTO:
        resolved = {"tpu": "splash", "gpu": "cudnn" if dtype in _HALF and not old_gpu else "xla"}.get(platform, "xla")
    if resolved not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {ATTENTION_CHOICES}.")
    if platform not in ATTENTION_IMPLS[resolved]:
        raise ValueError(f"attention_impl={impl!r} cannot run on {platform!r}: {resolved} runs on "
                         f"{ATTENTION_IMPLS[resolved]}; use 'auto' or 'xla'.")
    if resolved == "cudnn" and dtype not in _HALF:
        raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 inputs, got {dtype}; "
                         "set the model dtype to bfloat16, or use 'auto' (xla for float32) or 'pallas'.")
    if resolved == "cudnn" and old_gpu:
        raise ValueError(f"attention_impl='cudnn' cannot run on this GPU: {old_why}; use 'auto' (xla there), "
                         "'xla' or 'pallas'.")
    _log_once("attention", resolved, impl, dtype.name, platform, old_why if impl == AUTO else "")
    return resolved


def cudnn_unsupported(seq_len: int, head_dim: int, packed: bool, capability: tuple[int, int] | None) -> str:
    """Why cuDNN's fused attention (jax.nn.dot_product_attention, jax 0.10.2) cannot train a call of these shapes,
    or "" if it can. Packed rows (segment ids) enter cuDNN as a [B, 1, S, S] bias, and JAX trains with a bias only
    at an even length; the head size must be a multiple of 8, at most 128 (256 from compute capability 9.0)."""
    head_max = 256 if capability is not None and capability >= (9, 0) else 128
    if head_dim % 8 or head_dim > head_max:
        return f"head_dim={head_dim} is not a multiple of 8 up to {head_max} (cuDNN on this GPU)"
    if packed and seq_len % 2:
        return (f"packed rows (segment ids) enter cuDNN as a [B, 1, S, S] bias, which JAX trains only at an even "
                f"length, and S={seq_len}")
    return ""


def attention_for_call(impl: str, fallback: str | None, seq_len: int, head_dim: int, packed: bool,
                       capability: tuple[int, int] | None = None) -> str:
    """The implementation that runs one attention call: `impl` (resolved), unless it is cudnn and cuDNN cannot
    train these shapes (`cudnn_unsupported`); then `fallback` (what `auto` resolved to cuDNN falls back to: xla),
    logged once with the reason, or a ValueError naming the fix when cudnn was asked for explicitly (fallback
    None). Decided while tracing, before anything compiles. `capability`: None is JAX's default GPU's."""
    if impl != "cudnn":
        return impl
    why = cudnn_unsupported(seq_len, head_dim, packed, capability or gpu_capability())
    if not why:
        return impl
    if fallback is None:
        raise ValueError(f"attention_impl='cudnn' cannot train this call: {why}; use attention_impl='auto' (which "
                         "runs xla for such calls) or 'xla', or an even --config.seq_len.")
    _log_once("attention", fallback, AUTO, None, "gpu", f"cuDNN cannot train this call: {why}")
    return fallback


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
