"""Fused causal/segmented attention: FlashAttention-2 as a Pallas kernel with a custom VJP.

    out = flash_attention(q, k, v, segment_ids, causal=True)      # q, k, v, out: [batch, seq, heads, head_dim]

Algorithm (Dao, "FlashAttention-2", arXiv:2307.08691, Alg. 1 and 2): the forward pass streams key/value blocks
through an online softmax (running max m, running sum l, fp32 accumulator), never materialising the [S, S]
matrix, and saves only out and the per-row logsumexp lse = m + log(l). The backward pass recomputes
P = exp(s - lse) block by block, forms dS = P * (dP - delta) with delta = rowsum(dO * O), and accumulates
dV = P^T dO, dK = scale * dS^T Q (one kernel, a program per key block) and dQ = scale * dS K (a second kernel, a
program per query block). Causal key blocks wholly above the diagonal are skipped, not masked.

Two lowerings of the same algorithm: `flash_attention_gpu.py` (Triton) and `flash_attention_tpu.py` (Mosaic).
This file validates inputs, pads the sequence to a block multiple (padded keys get a segment id that matches no
real token, so they are masked; padded rows are sliced off), picks block sizes, and wires the custom VJP.
The kernels are tested against `phi_jax.attention.xla_attention`, the model's XLA path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from phi_jax.dispatch import default_platform, pallas_target
from phi_jax.kernels import flash_attention_gpu, flash_attention_tpu
from phi_jax.kernels.flash_attention_common import PAD_SEGMENT_ID

_LOWERINGS = {"gpu": flash_attention_gpu, "tpu": flash_attention_tpu}
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Smallest legal block per lowering: Triton tiles are powers of two >= 16 (tl.dot's minimum); Mosaic blocks
# here are multiples of the 128-lane vreg width (key blocks are the lane dim of the [block_q, block_k] logits).
_MIN_BLOCK = {"gpu": 16, "tpu": 128}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. Forward: block_q x block_k. Backward: dK/dV kernel (block_q_dkv x block_k_dkv) and dQ kernel
    (block_q_dq x block_k_dq). num_warps / num_warps_bwd / num_stages are Triton launch parameters (ignored by the
    TPU lowering). All blocks are powers of two; the wrapper shrinks a block to the (padded) sequence when the
    sequence is shorter."""

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 2

    @classmethod
    def default(cls, backend: str, head_dim: int = 64) -> BlockSizes:
        """Starting points chosen by compiling, not by timing on hardware.

        GPU, H <= 64: 128x128 forward tiles and 64x128 (dK/dV) / 128x64 (dQ) backward tiles on 8 warps, picked
        by compiling candidates with tools/ptx_stats.py (fewest PTX instructions per score, no spills on sm_80
        and sm_90a; not timed); 3 pipeline stages, the fewest with which jaxlib's own Triton spills on neither
        arch (2 spilled in dK/dV on sm_80), keeping two K/V loads in flight. Larger heads halve block_k and use
        8 warps to bound registers; the backward holds more tiles live (q, k, v, dO, P, dS), hence 64x64 (32 key
        rows for H > 128).
        TPU: 512 x 512 in all three kernels. Bigger blocks amortise the ~0.35 us grid-step overhead; the TPU
        compiler accepts up to 1024 x 1024 even at H = 256 in fp32 within v5e's 16 MiB scoped VMEM, but causal
        blocks that cross the diagonal are half wasted: at S = 2048, 512-blocks compute 62.5% of the S x S scores
        and 1024-blocks 75% (the ideal is 50%). See docs/KERNELS.md.
        """
        if backend == "tpu":
            return cls(block_q=512, block_k=512, block_q_dkv=512, block_k_dkv=512, block_q_dq=512, block_k_dq=512)
        if backend == "gpu":
            if head_dim <= 64:   # chosen from tools/ptx_stats.py: no spills on sm_80/sm_90a (docs/KERNELS.md)
                return cls(block_q=128, block_k=128, block_q_dkv=64, block_k_dkv=128, block_q_dq=128,
                           block_k_dq=64, num_warps=8, num_warps_bwd=8, num_stages=3)
            if head_dim <= 128:
                return cls(block_q=128, block_k=32, num_warps=8, num_warps_bwd=8, num_stages=2)
            return cls(block_q=64, block_k=32, block_q_dkv=32, block_k_dkv=32, block_q_dq=32, block_k_dq=32,
                       num_warps=8, num_warps_bwd=8, num_stages=2)
        raise ValueError(f"{backend=} has no flash-attention lowering; use 'gpu' or 'tpu'.")

    def fit(self, backend: str, seq_len: int) -> BlockSizes:
        """Validate the blocks and shrink each to the smallest power of two covering seq_len (not below the
        lowering's minimum), so short sequences are not padded up to a large block."""
        minimum = _MIN_BLOCK[backend]
        cover = max(minimum, 1 << max(seq_len - 1, 0).bit_length())
        fitted = {}
        for f in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
            b = getattr(self, f)
            if b < minimum or b & (b - 1):
                raise ValueError(f"{f}={b} must be a power of two >= {minimum} for the {backend} lowering.")
            fitted[f] = min(b, cover)
        return dataclasses.replace(self, **fitted)

    @property
    def seq_multiple(self) -> int:
        """Sequence lengths are padded to a multiple of this (all blocks are powers of two: the largest)."""
        return max(self.block_q, self.block_k, self.block_q_dkv, self.block_k_dkv, self.block_q_dq,
                   self.block_k_dq)


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    sm_scale: float
    blocks: BlockSizes
    backend: str
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, st: _Static):
    return _flash_fwd(q, k, v, segment_ids, st)[0]


def _flash_fwd(q, k, v, segment_ids, st: _Static):
    o, lse = _LOWERINGS[st.backend].forward(q, k, v, segment_ids, sm_scale=st.sm_scale, causal=st.causal,
                                            blocks=st.blocks, interpret=st.interpret)
    return o, (q, k, v, segment_ids, o, lse)


def _flash_bwd(st: _Static, residuals, do):
    q, k, v, segment_ids, o, lse = residuals
    dq, dk, dv = _LOWERINGS[st.backend].backward(q, k, v, segment_ids, o, lse, do, sm_scale=st.sm_scale,
                                                 causal=st.causal, blocks=st.blocks, interpret=st.interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: jax.Array,  # [batch, seq, heads, head_dim]
    k: jax.Array,  # [batch, seq, heads, head_dim]
    v: jax.Array,  # [batch, seq, heads, head_dim]
    segment_ids: jax.Array | None = None,  # int [batch, seq]; tokens attend only within their segment
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    platform: str | None = None,
) -> jax.Array:  # [batch, seq, heads, head_dim], q.dtype
    """FlashAttention-2 self-attention; differentiable (custom VJP) in q, k, v.

    backend: "gpu" (Triton) or "tpu" (Mosaic); interpret: Pallas interpret mode. None resolves both for `platform`,
    where this runs ("cpu", "gpu", "tpu"; None: JAX's default backend; phi_jax.dispatch.pallas_target): its own
    lowering, compiled; on CPU the GPU-style one, interpreted.
    sm_scale defaults to head_dim ** -0.5. Any sequence length works (padded internally to a block multiple).
    """
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [batch, seq, heads, head_dim] of one shape; got {q.shape=}, "
                         f"{k.shape=}, {v.shape=}.")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must share one dtype among float32/bfloat16/float16; got {q.dtype=}, "
                         f"{k.dtype=}, {v.dtype=}.")
    batch, seq, _, head_dim = q.shape
    if not (32 <= head_dim <= 256 and head_dim % 16 == 0):
        raise ValueError(f"{head_dim=} is unsupported: it must be a multiple of 16 in [32, 256].")
    if seq == 0:
        raise ValueError(f"{seq=}: the sequence must not be empty.")
    if segment_ids is not None:
        if segment_ids.shape != (batch, seq) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an integer [batch, seq] = {(batch, seq)} array; got "
                             f"{segment_ids.shape=} {segment_ids.dtype=}.")
        segment_ids = segment_ids.astype(jnp.int32)
    backend, interpret = pallas_target(platform or default_platform(), backend, interpret)
    blocks = (block_sizes or BlockSizes.default(backend, head_dim)).fit(backend, seq)
    sm_scale = float(head_dim ** -0.5 if sm_scale is None else sm_scale)

    padded_seq = -(-seq // blocks.seq_multiple) * blocks.seq_multiple
    if padded_seq != seq:
        if segment_ids is None:
            segment_ids = jnp.zeros((batch, seq), jnp.int32)
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded_seq - seq)), constant_values=PAD_SEGMENT_ID)
    # Triton tiles must be powers of two: zero head_dim columns change neither q.k nor the kept output columns.
    padded_head = 1 << (head_dim - 1).bit_length() if backend == "gpu" else head_dim
    pad = ((0, 0), (0, padded_seq - seq), (0, 0), (0, padded_head - head_dim))
    if any(p[1] for p in pad):
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    out = _flash(q, k, v, segment_ids, _Static(causal, sm_scale, blocks, backend, interpret))
    return out[:, :seq, :, :head_dim]

