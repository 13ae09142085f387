"""Scaled dot-product attention behind one function with an `impl` switch.

`xla` is plain jnp (fp32 logits and softmax); `pallas` is phi_jax's FlashAttention-2 kernel; `cudnn` is
jax.nn.dot_product_attention's cuDNN path. `auto` picks Pallas on GPU/TPU and XLA on CPU. The path that runs
is logged once, and a path that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

log = logging.getLogger("phi_jax")
_LOGGED: set[tuple[str, str]] = set()


def resolve_attention_impl(impl: str) -> str:
    backend = jax.default_backend()
    resolved = impl if impl != "auto" else ("pallas" if backend in ("gpu", "tpu") else "xla")
    if resolved == "cudnn" and backend != "gpu":
        raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU, but the backend is {backend!r}; "
                         "use 'xla' or 'pallas' (interpret mode on CPU).")
    if (impl, resolved) not in _LOGGED:
        _LOGGED.add((impl, resolved))
        log.info("attention: %s (asked for %r on backend %r)", resolved, impl, backend)
    return resolved


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """q: [B, T, N, H]; k, v: [B, S, N, H]; mask: bool [B, T, S] (True = attend). Returns [B, T, N, H]."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array) -> jax.Array:
    """`xla_attention` over a KV cache laid out for its two products: keys [B*N, H, S], values [B*N, S, H].

    With that layout neither product transposes the cache, and no unit dimension (batch 1) makes XLA:CPU copy
    the cache after an in-place update. q: [B, T, N, H]; mask: bool [B, T, S]. Returns [B, T, N, H]."""
    b, t, n, h = q.shape
    q = q.transpose(0, 2, 1, 3).reshape(b * n, t, h)
    logits = jnp.einsum("xth,xhs->xts", q, k_cache, preferred_element_type=jnp.float32) * h**-0.5
    logits = jnp.where(mask[:, None], logits.reshape(b, n, t, -1), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype).reshape(b * n, t, -1)
    out = jnp.einsum("xts,xsh->xth", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3).astype(q.dtype)


def causal_segment_mask(segment_ids: jax.Array | None, seq_len: int) -> jax.Array:
    """[B or 1, S, S] bool: causal, and within one segment (packed document) when segment ids [B, S] are given."""
    mask = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
              impl: str = "auto") -> jax.Array:
    """Causal self-attention of a full sequence. q, k, v: [B, S, N, H]; segment_ids: int [B, S]."""
    impl = resolve_attention_impl(impl)
    if impl == "pallas":
        from phi_jax.kernels.flash_attention import flash_attention

        return flash_attention(q, k, v, segment_ids, causal=True)
    if impl == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; "
                             "set the model dtype to bfloat16 or use 'pallas'.")
        mask = None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")
    return xla_attention(q, k, v, causal_segment_mask(segment_ids, q.shape[1]))
