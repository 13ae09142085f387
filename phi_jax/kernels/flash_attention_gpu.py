"""FlashAttention-2 for GPUs through Pallas's Triton lowering (also the default kernel interpreted on CPU).

Arrays keep the model's layout, q/k/v/o [batch, seq, heads, head_dim]; the grid is (query blocks, batch, heads),
each program owns one query block (forward, dq) or one key block (dk/dv) and loops over the other axis with
`lax.fori_loop`, so on-chip state lives in registers/shared memory as Triton expects. Called by
`flash_attention.py` on arrays already padded to block multiples and to a power-of-two head_dim.
Paper: Dao, "FlashAttention-2" (arXiv:2307.08691), Algorithm 1 (forward) and Algorithm 2 (backward).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from phi_jax.kernels.flash_attention_common import (
    MASK_VALUE,
    causal_first_q_block,
    causal_num_kv_blocks,
    make_mask,
)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """fp32-accumulating matmul; HIGHEST keeps float32 inputs in IEEE fp32 (no TF32) under Triton."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _seg_slice(seg_ref, start: int | jax.Array, size: int) -> jax.Array | None:
    return None if seg_ref is None else seg_ref[pl.ds(start, size)]


# ----------------------------------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, has_seg: bool, sm_scale: float, causal: bool, block_q: int, block_k: int,
                num_kv_blocks: int):
    if has_seg:
        q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), seg_ref = refs, None
    qi = pl.program_id(0)
    q_start = qi * block_q
    q = q_ref[...]                                                    # [block_q, H]
    q_seg = _seg_slice(seg_ref, q_start, block_q)
    q_seg = None if q_seg is None else q_seg[:, None]

    def body(kj, carry):
        acc, m_prev, l_prev = carry
        k_start = kj * block_k
        k = k_ref[pl.ds(k_start, block_k), :]                         # [block_k, H]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = _dot(q, k, (1, 1)) * sm_scale                             # [block_q, block_k] fp32
        k_seg = _seg_slice(seg_ref, k_start, block_k)
        mask = make_mask(q_start, k_start, block_q, block_k, causal=causal, q_seg=q_seg,
                         k_seg=None if k_seg is None else k_seg[None, :])
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        # Online softmax (FA-2 Alg. 1 lines 8-10): rescale the running sums by exp(m_prev - m_next).
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.exp(s - m_next[:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)       # a fully masked block must add nothing, not exp(0) = 1
        alpha = jnp.exp(m_prev - m_next)
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
        return acc, m_next, l_next

    head_dim = q_ref.shape[-1]
    init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    upper = causal_num_kv_blocks(qi, block_q, block_k, num_kv_blocks) if causal else num_kv_blocks
    acc, m, row_sum = lax.fori_loop(0, upper, body, init)
    # Rows with no visible key (possible only with segment ids and causal=False) get output 0 and lse=+inf,
    # which makes the backward's exp(s - lse) exactly 0 for them.
    empty = row_sum == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, row_sum)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, row_sum)))


def forward(q, k, v, segment_ids, *, sm_scale: float, causal: bool, blocks, interpret) -> tuple[jax.Array, jax.Array]:
    """q, k, v: [B, S, N, H]; segment_ids: int32 [B, S] or None. Returns (o [B, S, N, H], lse fp32 [B, N, S])."""
    batch, seq, heads, head_dim = q.shape
    bq, bk = blocks.block_q, blocks.block_k
    has_seg = segment_ids is not None
    kernel = functools.partial(_fwd_kernel, has_seg=has_seg, sm_scale=sm_scale, causal=causal, block_q=bq,
                               block_k=bk, num_kv_blocks=seq // bk)
    q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, h, 0))
    in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
    if has_seg:
        in_specs.append(pl.BlockSpec((None, seq), lambda i, b, h: (b, 0)))
        args.append(segment_ids)
    return pl.pallas_call(
        kernel,
        grid=(seq // bq, batch, heads),
        in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="flash_attention_fwd_gpu",
    )(*args)


# ---------------------------------------------------------------------------------------------------- backward
def _dkv_kernel(*refs, has_seg: bool, sm_scale: float, causal: bool, block_q: int, block_k: int,
                num_q_blocks: int):
    """One key block; loops over query blocks (FA-2 Alg. 2 outer loop): dV = P^T dO, dK = scale * dS^T Q."""
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), seg_ref = refs, None
    kj = pl.program_id(0)
    k_start = kj * block_k
    k, v = k_ref[...], v_ref[...]                                     # [block_k, H]
    k_seg = _seg_slice(seg_ref, k_start, block_k)
    k_seg = None if k_seg is None else k_seg[None, :]

    def body(qi, carry):
        dk, dv = carry
        q_start = qi * block_q
        q = q_ref[pl.ds(q_start, block_q), :]
        do = do_ref[pl.ds(q_start, block_q), :]
        lse = lse_ref[pl.ds(q_start, block_q)]
        delta = delta_ref[pl.ds(q_start, block_q)]
        s = _dot(q, k, (1, 1)) * sm_scale                             # [block_q, block_k]
        q_seg = _seg_slice(seg_ref, q_start, block_q)
        mask = make_mask(q_start, k_start, block_q, block_k, causal=causal,
                         q_seg=None if q_seg is None else q_seg[:, None], k_seg=k_seg)
        p = jnp.exp(s - lse[:, None])                                 # recomputed P, exact softmax
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
        dp = _dot(do, v, (1, 1))
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
        return dk, dv

    head_dim = k_ref.shape[-1]
    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    lower = causal_first_q_block(kj, block_k, block_q) if causal else 0
    dk, dv = lax.fori_loop(lower, num_q_blocks, body, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, has_seg: bool, sm_scale: float, causal: bool, block_q: int, block_k: int,
               num_kv_blocks: int):
    """One query block; loops over key blocks: dQ = scale * dS K."""
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), seg_ref = refs, None
    qi = pl.program_id(0)
    q_start = qi * block_q
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = _seg_slice(seg_ref, q_start, block_q)
    q_seg = None if q_seg is None else q_seg[:, None]

    def body(kj, dq):
        k_start = kj * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = _dot(q, k, (1, 1)) * sm_scale
        k_seg = _seg_slice(seg_ref, k_start, block_k)
        mask = make_mask(q_start, k_start, block_q, block_k, causal=causal, q_seg=q_seg,
                         k_seg=None if k_seg is None else k_seg[None, :])
        p = jnp.exp(s - lse[:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    upper = causal_num_kv_blocks(qi, block_q, block_k, num_kv_blocks) if causal else num_kv_blocks
    dq = lax.fori_loop(0, upper, body, jnp.zeros(q_ref.shape, jnp.float32))
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def backward(q, k, v, segment_ids, o, lse, do, *, sm_scale: float, causal: bool, blocks, interpret):
    """Returns (dq, dk, dv), each [B, S, N, H] in the input dtype."""
    batch, seq, heads, head_dim = q.shape
    # delta_i = rowsum(dO_i * O_i) (FA-2 Alg. 2 line 4): elementwise, left to XLA to fuse.
    delta = jnp.einsum("bsnh,bsnh->bns", o.astype(jnp.float32), do.astype(jnp.float32))
    has_seg = segment_ids is not None
    params = plgpu.CompilerParams(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages)
    full_seq = pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, h, 0))
    full_row = pl.BlockSpec((None, None, seq), lambda i, b, h: (b, h, 0))
    seg_spec = [pl.BlockSpec((None, seq), lambda i, b, h: (b, 0))] if has_seg else []
    seg_arg = [segment_ids] if has_seg else []

    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    k_spec = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, has_seg=has_seg, sm_scale=sm_scale, causal=causal, block_q=bq, block_k=bk,
                          num_q_blocks=seq // bq),
        grid=(seq // bk, batch, heads),
        in_specs=[full_seq, k_spec, k_spec, full_seq, full_row, full_row, *seg_spec],
        out_specs=[k_spec, k_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv_gpu",
    )(q, k, v, do, lse, delta, *seg_arg)

    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, has_seg=has_seg, sm_scale=sm_scale, causal=causal, block_q=bq, block_k=bk,
                          num_kv_blocks=seq // bk),
        grid=(seq // bq, batch, heads),
        in_specs=[q_spec, full_seq, full_seq, q_spec, row_spec, row_spec, *seg_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq_gpu",
    )(q, k, v, do, lse, delta, *seg_arg)
    return dq, dk, dv
