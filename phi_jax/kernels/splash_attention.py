"""Causal (and packed-document) self-attention through JAX's own Pallas TPU kernel, splash attention.

    out = splash_attention(q, k, v, segment_ids)       # q, k, v, out: [batch, seq, heads, head_dim]

`jax.experimental.pallas.ops.tpu.splash_attention` is maintained with JAX and tuned on TPUs; it is the TPU
default of `attention_impl=auto` until phi_jax's own Mosaic kernel is measured faster on a TPU. This wrapper
adapts it to phi_jax's layout and semantics: splash takes [heads, seq, head_dim] per example (vmapped over the
batch here), does not scale q (scaled here by head_dim ** -0.5), and needs the sequence to be a multiple of its
blocks. Any length works: the sequence is zero-padded at the end. Under the causal mask no real query sees a
padded key; padded queries (sliced off, zero cotangent) see themselves, so no softmax row is empty. With segment
ids the padded positions get their own id, `PAD_SEGMENT_ID`, which matches no real token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from phi_jax.dispatch import default_platform, pallas_target
from phi_jax.kernels.flash_attention_common import PAD_SEGMENT_ID

LANES = 128
# 512-row blocks: the largest that keeps every splash kernel inside v5e's 16 MiB scoped VMEM at head_dim 128
# (compiled for v5e and v6e by tests/test_compile_tpu.py); MaxText's default for splash as well.
MAX_BLOCK = 512


def block_size(seq: int) -> int:
    """One block size for every splash kernel: MAX_BLOCK, or the sequence rounded up to 128 lanes if shorter."""
    return min(MAX_BLOCK, -(-seq // LANES) * LANES)


@functools.lru_cache(maxsize=32)
def _kernel(seq: int, heads: int, block: int, interpret: bool) -> splash.SplashAttentionKernel:
    """The splash kernel for a causal [seq, seq] mask on every head (the mask is preprocessed once, in numpy)."""
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq, seq))] * heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(
    q: jax.Array,  # [batch, seq, heads, head_dim]
    k: jax.Array,  # [batch, seq, heads, head_dim]
    v: jax.Array,  # [batch, seq, heads, head_dim]
    segment_ids: jax.Array | None = None,  # int [batch, seq]
    *,
    interpret: bool | None = None,
    platform: str | None = None,
) -> jax.Array:  # [batch, seq, heads, head_dim], q.dtype
    """Causal self-attention with splash attention's forward and backward kernels (differentiable in q, k, v).

    interpret: Pallas TPU interpret mode; None means True on CPU (tests) and False on a TPU. `platform` is where this
    runs (None: JAX's default backend; phi_jax.dispatch.pallas_target; a GPU is an error).
    """
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [batch, seq, heads, head_dim] of one shape; got {q.shape=}, "
                         f"{k.shape=}, {v.shape=}.")
    batch, seq, heads, head_dim = q.shape
    if segment_ids is not None and segment_ids.shape != (batch, seq):
        raise ValueError(f"segment_ids must be [batch, seq] = {(batch, seq)}; got {segment_ids.shape}.")
    _, interpret = pallas_target(platform or default_platform(), "tpu", interpret)
    block = block_size(seq)
    padded = -(-seq // block) * block
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)  # splash computes q @ k.T unscaled
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, N, S, H]
    if padded != seq:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, padded - seq), (0, 0))) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - seq)), constant_values=PAD_SEGMENT_ID)
    with jax.ensure_compile_time_eval():  # concrete mask tables, cached across traces (no leaked tracers)
        kernel = _kernel(padded, heads, block, interpret)
    if segment_ids is None:
        out = jax.vmap(lambda q, k, v: kernel(q, k, v))(q, k, v)
    else:
        seg = segment_ids.astype(jnp.int32)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(q, k, v, seg)
    return jnp.swapaxes(out, 1, 2)[:, :seq]
