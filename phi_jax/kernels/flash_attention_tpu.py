"""FlashAttention-2 for TPUs through Pallas's Mosaic lowering.

Mosaic wants the last two block dims to be (8, 128)-tiled, so this file works in [batch, heads, seq, head_dim]
(the wrapper transposes the model's [B, S, N, H]) and blocks are (block, head_dim) with head_dim the full dim.
The key loop is the last grid axis ("arbitrary"); the online-softmax state m, l and the fp32 accumulator live in
VMEM scratch across it, lane-broadcast as [rows, 128] so they are full vregs.

In HBM the per-row statistics lse and delta are lane-dense rows [B, N, 1, S] (as in splash attention), not
lane-broadcast [B, N, S, 128] columns: the dK/dV kernel re-reads them at every grid step, and 128x the bytes made
it memory-bound. That kernel therefore works transposed, on s^T = k q^T [block_k, block_q], where a [1, block_q]
row broadcasts down the sublanes for free (and dV = p^T dO, dK = ds^T q need no transposed operands); the dQ
kernel turns its row into a column once per grid step.

Causal masking is applied only to blocks that cross the diagonal: interior blocks run an unmasked body.
Segment ids (query ids lane-broadcast [B, S, 128], key ids sublane-broadcast [B, 8, S]) are masked in every block.
Skipped causal blocks are not computed (`pl.when`) and their index maps repeat the previous block index, so the
pipeline does not DMA them either. Same algorithm as `flash_attention_gpu.py` (FA-2, arXiv:2307.08691).
Every matmul of fp32 inputs asks for fp32 contraction explicitly (`_precision`); scores are masked after scaling.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from phi_jax.attention_mask import attention_mask
from phi_jax.kernels.flash_attention_common import (
    MASK_VALUE,
    block_is_visible,
    causal_first_q_block,
    causal_num_kv_blocks,
    check_sm_scale,
)

LANES = 128
SUBLANES = 8
_TRANS_B = (((1,), (1,)), ((), ()))


def _precision(dtype) -> lax.Precision | None:
    """fp32 inputs ask Mosaic for fp32 contraction (`#tpu.contract_precision<fp32>`) instead of leaving it to the
    default, which may run the MXU in bf16 passes; 16-bit inputs take the default (exact products, fp32 sums)."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _qk(q: jax.Array, k: jax.Array) -> jax.Array:
    """q @ k.T in fp32 (contracting the last dims: no transposed copy)."""
    return lax.dot_general(q, k, _TRANS_B, precision=_precision(q.dtype), preferred_element_type=jnp.float32)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b in fp32."""
    return lax.dot(a, b, precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _tile_lanes(x: jax.Array, width: int) -> jax.Array:
    """[rows, 128] lane-broadcast statistic -> [rows, width] (width a multiple of 128, or <= 128)."""
    if width <= LANES:
        return x[:, :width]
    if width % LANES == 0:
        return jnp.tile(x, (1, width // LANES))
    return jnp.broadcast_to(x[:, :1], (x.shape[0], width))


def _row_to_column(row: jax.Array) -> jax.Array:
    """[1, n] lane-dense row -> [n, 128] lane-broadcast column (one XLU transpose of a (128, n) tile)."""
    return jnp.transpose(jnp.broadcast_to(row, (LANES, row.shape[1])))


def _bodies(causal: bool, q_block, block_q: int, kv_block, block_k: int):
    """[(run condition or None, apply the causal mask)]: without causality one unconditional, unmasked body;
    with it, an unmasked body for blocks wholly below the diagonal and a masked one for blocks that cross it.
    Blocks wholly above the diagonal run neither."""
    if not causal:
        return [(None, False)]
    visible = block_is_visible(q_block, block_q, kv_block, block_k)
    crosses = kv_block * block_k + block_k - 1 > q_block * block_q  # some key lies after some query
    return [(jnp.logical_and(visible, jnp.logical_not(crosses)), False), (jnp.logical_and(visible, crosses), True)]


def _when(condition):
    """pl.when, or run unconditionally when condition is None."""
    return (lambda body: body()) if condition is None else pl.when(condition)


def _interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _segments(segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array] | None:
    """(ids as lane-broadcast columns [B, S, 128], ids as sublane-broadcast rows [B, 8, S])."""
    if segment_ids is None:
        return None
    batch, seq = segment_ids.shape
    column = jnp.broadcast_to(segment_ids[:, :, None], (batch, seq, LANES))
    row = jnp.broadcast_to(segment_ids[:, None, :], (batch, SUBLANES, seq))
    return column, row


def _mask(row_seg_ref, col_seg_ref, q_start, k_start, shape: tuple[int, int], causal: bool, keys_on_rows=False):
    """bool `shape` or None (phi_jax.attention_mask, from the kernel's layout): the rows' ids come as a
    lane-broadcast [rows, 128] column block, the columns' as a sublane-broadcast [8, cols] row block. Rows are
    queries, or keys for the transposed scores s^T of the dK/dV kernel (`keys_on_rows`)."""
    rows = cols = None
    if row_seg_ref is not None:
        rows, cols = _tile_lanes(row_seg_ref[...], shape[1]), col_seg_ref[:1, :]
    q_seg, k_seg = (cols, rows) if keys_on_rows else (rows, cols)
    return attention_mask(shape, causal=causal, q_start=q_start, k_start=k_start, q_segment_ids=q_seg,
                          kv_segment_ids=k_seg, keys_on_rows=keys_on_rows)


# ----------------------------------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, has_seg: bool, sm_scale: float, causal: bool, block_q: int, block_k: int):
    if has_seg:
        q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
        q_seg_ref = kv_seg_ref = None
    qi, kj = pl.program_id(2), pl.program_id(3)
    head_dim = acc_sc.shape[-1]

    @pl.when(kj == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(causal_mask: bool):
        v = v_ref[...]
        s = _qk(q_ref[...], k_ref[...]) * sm_scale                    # [block_q, block_k] fp32
        mask = _mask(q_seg_ref, kv_seg_ref, qi * block_q, kj * block_k, (block_q, block_k), causal_mask)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev, l_prev = m_sc[...], l_sc[...]                         # [block_q, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _tile_lanes(m_next, block_k))
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        pv = _mm(p.astype(v.dtype), v)
        acc_sc[...] = acc_sc[...] * _tile_lanes(alpha, head_dim) + pv

    for condition, causal_mask in _bodies(causal, qi, block_q, kj, block_k):
        _when(condition)(lambda causal_mask=causal_mask: step(causal_mask))

    @pl.when(kj == pl.num_programs(3) - 1)
    def _finish():
        row_sum = l_sc[...]
        empty = row_sum == 0.0                         # no visible key: output 0, lse=+inf (backward P = 0)
        l_safe = jnp.where(empty, 1.0, row_sum)
        o_ref[...] = (acc_sc[...] / _tile_lanes(l_safe, head_dim)).astype(o_ref.dtype)
        lse = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log(l_safe))  # [block_q, 128] lane-broadcast
        lse_ref[...] = jnp.transpose(lse)[:1, :]                       # -> the lane-dense row [1, block_q]


def forward(q, k, v, segment_ids, *, sm_scale: float, causal: bool, blocks, interpret):
    """q, k, v: [B, S, N, H]; returns (o [B, S, N, H], lse fp32 [B, N, S])."""
    check_sm_scale(sm_scale)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))                # [B, N, S, H]
    batch, heads, seq, head_dim = q.shape
    bq, bk = blocks.block_q, blocks.block_k
    nk = seq // bk
    segs = _segments(segment_ids)

    def kv_block(i, j):
        # Past the diagonal, re-point at the last visible block: same index => no new DMA.
        return jnp.minimum(j, causal_num_kv_blocks(i, bq, bk, nk) - 1) if causal else j

    q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i, j: (b, h, kv_block(i, j), 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j: (b, h, 0, i))
    in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
    if segs is not None:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, kv_block(i, j)))]
        args += list(segs)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, has_seg=segs is not None, sm_scale=sm_scale, causal=causal, block_q=bq,
                          block_k=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(batch, heads, seq // bq, nk),
            in_specs=in_specs,
            out_specs=[q_spec, row_spec],
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, head_dim), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, 1, seq), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="flash_attention_fwd_tpu",
    )(*args)
    return jnp.swapaxes(o, 1, 2), lse[:, :, 0, :]


# ---------------------------------------------------------------------------------------------------- backward
def _dkv_kernel(*refs, has_seg: bool, sm_scale: float, causal: bool, block_q: int, block_k: int):
    """One key block, looping over query blocks, in the transposed orientation s^T = k q^T [block_k, block_q]."""
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, k_seg_ref, q_seg_ref, dk_ref, dv_ref,
         dk_sc, dv_sc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
        k_seg_ref = q_seg_ref = None
    kj, qi = pl.program_id(2), pl.program_id(3)

    @pl.when(qi == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(causal_mask: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_t = _qk(k, q) * sm_scale                                    # [block_k, block_q]
        p_t = jnp.exp(s_t - lse_ref[...])                             # lse: a [1, block_q] row
        mask = _mask(k_seg_ref, q_seg_ref, qi * block_q, kj * block_k, (block_k, block_q), causal_mask,
                     keys_on_rows=True)
        if mask is not None:
            p_t = jnp.where(mask, p_t, 0.0)
        dv_sc[...] += _mm(p_t.astype(do.dtype), do)
        ds_t = p_t * (_qk(v, do) - delta_ref[...])                    # dP^T = v dO^T
        dk_sc[...] += _mm(ds_t.astype(q.dtype), q)

    for condition, causal_mask in _bodies(causal, qi, block_q, kj, block_k):
        _when(condition)(lambda causal_mask=causal_mask: step(causal_mask))

    @pl.when(qi == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, has_seg: bool, sm_scale: float, causal: bool, block_q: int, block_k: int):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref, dq_sc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
        q_seg_ref = kv_seg_ref = None
    qi, kj = pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(causal_mask: bool):
        k = k_ref[...]
        s = _qk(q_ref[...], k) * sm_scale
        p = jnp.exp(s - _tile_lanes(_row_to_column(lse_ref[...]), block_k))
        mask = _mask(q_seg_ref, kv_seg_ref, qi * block_q, kj * block_k, (block_q, block_k), causal_mask)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (_qk(do_ref[...], v_ref[...]) - _tile_lanes(_row_to_column(delta_ref[...]), block_k))
        dq_sc[...] += _mm(ds.astype(k.dtype), k)

    for condition, causal_mask in _bodies(causal, qi, block_q, kj, block_k):
        _when(condition)(lambda causal_mask=causal_mask: step(causal_mask))

    @pl.when(kj == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * sm_scale).astype(dq_ref.dtype)


def backward(q, k, v, segment_ids, o, lse, do, *, sm_scale: float, causal: bool, blocks, interpret):
    """Returns (dq, dk, dv), each [B, S, N, H] in the input dtype."""
    delta = jnp.einsum("bsnh,bsnh->bns", o.astype(jnp.float32), do.astype(jnp.float32))
    q, k, v, do = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, do))        # [B, N, S, H]
    batch, heads, seq, head_dim = q.shape
    lse, delta = lse[:, :, None, :], delta[:, :, None, :]               # lane-dense rows [B, N, 1, S]
    segs = _segments(segment_ids)
    has_seg = segs is not None
    seg_args = list(segs) if has_seg else []
    semantics = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    # dk, dv: grid (b, h, key block j, query block i); query blocks before the diagonal are clamped forward.
    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv

    def q_block(j, i):
        return jnp.maximum(i, causal_first_q_block(j, bk, bq)) if causal else i

    q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, j, i: (b, h, q_block(j, i), 0))
    k_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, i: (b, h, j, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, j, i: (b, h, 0, q_block(j, i)))
    seg_specs = [pl.BlockSpec((None, bk, LANES), lambda b, h, j, i: (b, j, 0)),               # key ids, column
                 pl.BlockSpec((None, SUBLANES, bq), lambda b, h, j, i: (b, 0, q_block(j, i)))  # query ids, row
                 ] if has_seg else []
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, has_seg=has_seg, sm_scale=sm_scale, causal=causal, block_q=bq, block_k=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(batch, heads, seq // bk, seq // bq),
            in_specs=[q_spec, k_spec, k_spec, q_spec, row_spec, row_spec, *seg_specs],
            out_specs=[k_spec, k_spec],
            scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=semantics,
        interpret=_interpret(interpret),
        name="flash_attention_dkv_tpu",
    )(q, k, v, do, lse, delta, *seg_args)

    # dq: grid (b, h, query block i, key block j); key blocks past the diagonal are clamped back.
    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    nk = seq // bk

    def kv_block(i, j):
        return jnp.minimum(j, causal_num_kv_blocks(i, bq, bk, nk) - 1) if causal else j

    q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0))
    k_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i, j: (b, h, kv_block(i, j), 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j: (b, h, 0, i))
    seg_specs = [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
                 pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, kv_block(i, j)))] if has_seg else []
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, has_seg=has_seg, sm_scale=sm_scale, causal=causal, block_q=bq, block_k=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(batch, heads, seq // bq, nk),
            in_specs=[q_spec, k_spec, k_spec, q_spec, row_spec, row_spec, *seg_specs],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=semantics,
        interpret=_interpret(interpret),
        name="flash_attention_dq_tpu",
    )(q, k, v, do, lse, delta, *seg_args)
    return tuple(jnp.swapaxes(x, 1, 2) for x in (dq, dk, dv))
