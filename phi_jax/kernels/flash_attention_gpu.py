"""FlashAttention-2 for GPUs through Pallas's Triton lowering (also the default kernel interpreted on CPU).

Arrays keep the model's layout, q/k/v/o [batch, seq, heads, head_dim]; the grid is (query blocks, batch, heads),
each program owns one query block (forward, dq) or one key block (dk/dv) and loops over the other axis with
`lax.fori_loop`, so on-chip state lives in registers/shared memory as Triton expects. Called by
`flash_attention.py` on arrays already padded to block multiples and to a power-of-two head_dim.
Paper: Dao, "FlashAttention-2" (arXiv:2307.08691), Algorithm 1 (forward) and Algorithm 2 (backward).

Two loops per program, as in the Triton FA-2 tutorial: an unmasked loop over the *interior* blocks (wholly below
the causal diagonal and, with segment ids, holding one segment that is also the program's only segment) and a
masked loop over every other block that holds a visible pair (the diagonal, segment boundaries). Which blocks
are which is computed once per call in XLA from per-block segment min/max (`loop_bounds`), so any segment ids,
packed or not, stay exact: a block is unmasked only when its mask is provably all-true.

Softmax in base 2: scores are multiplied by sm_scale * log2(e) inside one FMA (s * c - m) and exponentiated with
exp2, so no separate scale multiply runs per score. q is not pre-scaled: in bf16 that would round q once more
for no saving (the FMA replaces the subtraction). lse stays in natural-log units between forward and backward.
Masked scores get `masked_logit(scale)`, a logit that stays finite once scaled, for any sm_scale.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from phi_jax.attention_mask import attention_mask
from phi_jax.kernels.flash_attention_common import check_sm_scale, masked_logit

LOG2E = math.log2(math.e)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """fp32-accumulating matmul; HIGHEST keeps float32 inputs in IEEE fp32 (no TF32) under Triton."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _seg_slice(seg_ref, start: int | jax.Array, size: int) -> jax.Array | None:
    return None if seg_ref is None else seg_ref[pl.ds(start, size)]


# ------------------------------------------------------------------------------------------------- loop bounds
def loop_bounds(segment_ids: jax.Array | None, seq: int, *, block_q: int, block_k: int, causal: bool,
                per_key_block: bool) -> jax.Array:
    """int32 [B or 1, programs, 4]: (lo, ulo, uhi, hi) for each program's loop over the other axis.

    Programs are query blocks (forward, dq) or key blocks (dk/dv, `per_key_block`). Blocks [lo, hi) are the
    only ones that can hold a visible pair; [ulo, uhi) is a run of interior blocks whose mask is all-true (the
    first such run; with contiguous packed documents it is the only one), looped over without masks. The masked
    loop visits [lo, ulo) and [uhi, hi). When no interior block exists, ulo = uhi = hi.
    """
    nq, nk = seq // block_q, seq // block_k
    q_first = np.arange(nq)[:, None] * block_q
    k_first = np.arange(nk)[None, :] * block_k
    if causal:
        any_visible = k_first <= q_first + block_q - 1          # some key <= some query
        all_visible = k_first + block_k - 1 <= q_first          # every key <= every query
    else:
        any_visible = all_visible = np.ones((nq, nk), bool)
    need, interior = jnp.asarray(any_visible)[None], jnp.asarray(all_visible)[None]   # [1, nq, nk]
    if segment_ids is not None:
        batch = segment_ids.shape[0]
        qs, ks = segment_ids.reshape(batch, nq, block_q), segment_ids.reshape(batch, nk, block_k)
        qmin, qmax = qs.min(-1)[:, :, None], qs.max(-1)[:, :, None]
        kmin, kmax = ks.min(-1)[:, None, :], ks.max(-1)[:, None, :]
        need = need & (qmin <= kmax) & (kmin <= qmax)           # id ranges overlap: a pair may match
        interior = interior & (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
    if per_key_block:
        need, interior = need.transpose(0, 2, 1), interior.transpose(0, 2, 1)
    n = need.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    hi = jnp.max(jnp.where(need, idx + 1, 0), axis=-1)
    lo = jnp.minimum(jnp.min(jnp.where(need, idx, n), axis=-1), hi)
    ulo = jnp.min(jnp.where(interior, idx, n), axis=-1)
    uhi = jnp.min(jnp.where(~interior & (idx > ulo[..., None]), idx, n), axis=-1)
    none = ulo == n
    ulo, uhi = jnp.where(none, hi, ulo), jnp.where(none, hi, uhi)
    return jnp.stack([lo, ulo, uhi, hi], axis=-1).astype(jnp.int32)


def _bounds_spec(bounds: jax.Array) -> pl.BlockSpec:
    per_batch = bounds.shape[0] > 1
    return pl.BlockSpec((None, None, 4), lambda i, b, h: (b if per_batch else 0, i, 0))


def _two_loops(bounds_ref, step, init):
    """Runs step(block, carry, masked) over the interior run unmasked, then over the rest masked."""
    lo, ulo, uhi, hi = (bounds_ref[i] for i in range(4))
    carry = lax.fori_loop(ulo, uhi, lambda j, c: step(j, c, False), init)
    n_before = ulo - lo

    def masked(t, c):
        return step(jnp.where(t < n_before, lo + t, uhi + (t - n_before)), c, True)

    return lax.fori_loop(0, n_before + (hi - uhi), masked, carry)


# ----------------------------------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, has_seg: bool, sm_scale: float, causal: bool, block_q: int, block_k: int):
    if has_seg:
        q_ref, k_ref, v_ref, bounds_ref, seg_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, bounds_ref, o_ref, lse_ref), seg_ref = refs, None
    q_start = pl.program_id(0) * block_q
    q = q_ref[...]                                                    # [block_q, H]
    q_seg = _seg_slice(seg_ref, q_start, block_q)
    q_seg = None if q_seg is None else q_seg[:, None]
    scale = sm_scale * LOG2E                                          # base-2 logits: s * scale
    mask_value = masked_logit(scale)                                  # finite after the scale, any sm_scale

    def step(kj, carry, masked: bool):
        acc, m_prev, l_prev = carry                                   # m in base-2 logit units
        k_start = pl.multiple_of(kj * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]                         # [block_k, H]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = _dot(q, k, (1, 1))                                        # [block_q, block_k] fp32, unscaled
        mask = None
        if masked:
            k_seg = _seg_slice(seg_ref, k_start, block_k)
            mask = attention_mask((block_q, block_k), causal=causal, q_start=q_start, k_start=k_start,
                                  q_segment_ids=q_seg, kv_segment_ids=None if k_seg is None else k_seg[None, :])
            s = jnp.where(mask, s, mask_value)
        # Online softmax (FA-2 Alg. 1 lines 8-10); scale > 0, so the row max is taken before scaling.
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1) * scale)
        p = jnp.exp2(s * scale - m_next[:, None])                    # one FMA + ex2 per score
        if mask is not None:
            p = jnp.where(mask, p, 0.0)       # a fully masked row of a block must add nothing, not exp2(0) = 1
        alpha = jnp.exp2(m_prev - m_next)
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
        return acc, m_next, l_next

    head_dim = q_ref.shape[-1]
    init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, row_sum = _two_loops(bounds_ref, step, init)
    # Rows with no visible key (possible only with segment ids and causal=False) get output 0 and lse=+inf,
    # which makes the backward's exp2(s * scale - lse * log2 e) exactly 0 for them.
    empty = row_sum == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, row_sum)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, row_sum))) / LOG2E)


def forward(q, k, v, segment_ids, *, sm_scale: float, causal: bool, blocks, interpret) -> tuple[jax.Array, jax.Array]:
    """q, k, v: [B, S, N, H]; segment_ids: int32 [B, S] or None. Returns (o [B, S, N, H], lse fp32 [B, N, S])."""
    check_sm_scale(sm_scale)
    batch, seq, heads, head_dim = q.shape
    bq, bk = blocks.block_q, blocks.block_k
    has_seg = segment_ids is not None
    bounds = loop_bounds(segment_ids, seq, block_q=bq, block_k=bk, causal=causal, per_key_block=False)
    kernel = functools.partial(_fwd_kernel, has_seg=has_seg, sm_scale=sm_scale, causal=causal, block_q=bq,
                               block_k=bk)
    q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, h, 0))
    in_specs, args = [q_spec, kv_spec, kv_spec, _bounds_spec(bounds)], [q, k, v, bounds]
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
def _dkv_kernel(*refs, has_seg: bool, sm_scale: float, causal: bool, block_q: int, block_k: int):
    """One key block; loops over query blocks (FA-2 Alg. 2 outer loop): dV = P^T dO, dK = scale * dS^T Q.

    Works on transposed scores [block_k, block_q] (k q^T), as the Triton FA-2 tutorial does, so P^T and dS^T
    feed the dV and dK matmuls as computed, without a transpose through shared memory.
    """
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bounds_ref, seg_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bounds_ref, dk_ref, dv_ref), seg_ref = refs, None
    k_start = pl.program_id(0) * block_k
    k, v = k_ref[...], v_ref[...]                                     # [block_k, H]
    k_seg = _seg_slice(seg_ref, k_start, block_k)
    scale = sm_scale * LOG2E

    def step(qi, carry, masked: bool):
        dk, dv = carry
        q_start = pl.multiple_of(qi * block_q, block_q)
        q = q_ref[pl.ds(q_start, block_q), :]
        do = do_ref[pl.ds(q_start, block_q), :]
        lse2 = lse_ref[pl.ds(q_start, block_q)] * LOG2E
        delta = delta_ref[pl.ds(q_start, block_q)]
        p_t = jnp.exp2(_dot(k, q, (1, 1)) * scale - lse2[None, :])   # recomputed P^T [block_k, block_q]
        if masked:
            q_seg = _seg_slice(seg_ref, q_start, block_q)
            mask_t = attention_mask((block_k, block_q), causal=causal, q_start=q_start, k_start=k_start,
                                    q_segment_ids=None if q_seg is None else q_seg[None, :],
                                    kv_segment_ids=None if k_seg is None else k_seg[:, None], keys_on_rows=True)
            p_t = jnp.where(mask_t, p_t, 0.0)
        dv = dv + _dot(p_t.astype(do.dtype), do, (1, 0))
        ds_t = p_t * (_dot(v, do, (1, 1)) - delta[None, :])
        dk = dk + _dot(ds_t.astype(q.dtype), q, (1, 0))
        return dk, dv

    zeros = jnp.zeros(k_ref.shape, jnp.float32)
    dk, dv = _two_loops(bounds_ref, step, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, has_seg: bool, sm_scale: float, causal: bool, block_q: int, block_k: int):
    """One query block; loops over key blocks: dQ = scale * dS K."""
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bounds_ref, seg_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bounds_ref, dq_ref), seg_ref = refs, None
    q_start = pl.program_id(0) * block_q
    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...] * LOG2E, delta_ref[...]
    q_seg = _seg_slice(seg_ref, q_start, block_q)
    q_seg = None if q_seg is None else q_seg[:, None]
    scale = sm_scale * LOG2E

    def step(kj, dq, masked: bool):
        k_start = pl.multiple_of(kj * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        p = jnp.exp2(_dot(q, k, (1, 1)) * scale - lse2[:, None])
        if masked:
            k_seg = _seg_slice(seg_ref, k_start, block_k)
            mask = attention_mask((block_q, block_k), causal=causal, q_start=q_start, k_start=k_start,
                                  q_segment_ids=q_seg, kv_segment_ids=None if k_seg is None else k_seg[None, :])
            p = jnp.where(mask, p, 0.0)
        ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = _two_loops(bounds_ref, step, jnp.zeros(q_ref.shape, jnp.float32))
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
    bounds = loop_bounds(segment_ids, seq, block_q=bq, block_k=bk, causal=causal, per_key_block=True)
    k_spec = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, has_seg=has_seg, sm_scale=sm_scale, causal=causal, block_q=bq, block_k=bk),
        grid=(seq // bk, batch, heads),
        in_specs=[full_seq, k_spec, k_spec, full_seq, full_row, full_row, _bounds_spec(bounds), *seg_spec],
        out_specs=[k_spec, k_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv_gpu",
    )(q, k, v, do, lse, delta, bounds, *seg_arg)

    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    bounds = loop_bounds(segment_ids, seq, block_q=bq, block_k=bk, causal=causal, per_key_block=False)
    q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, has_seg=has_seg, sm_scale=sm_scale, causal=causal, block_q=bq, block_k=bk),
        grid=(seq // bq, batch, heads),
        in_specs=[q_spec, full_seq, full_seq, q_spec, row_spec, row_spec, _bounds_spec(bounds), *seg_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq_gpu",
    )(q, k, v, do, lse, delta, bounds, *seg_arg)
    return dq, dk, dv
