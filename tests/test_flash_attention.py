"""FlashAttention kernel vs `xla_attention`: outputs and jax.grad, in Pallas interpret mode on CPU.

The reference is the model's XLA path (phi_jax.attention.xla_attention, fp32 logits and softmax, its FA-2 style
backward) with its mask from the one mask builder the kernels use too (phi_jax.attention_mask).

Interpret mode fills every output buffer with NaN before the kernel runs (checked in `test_interpret_poisons_
outputs`), so an element a kernel forgets to write fails the comparisons below. The `TestCompiled` class repeats
the checks compiled on a GPU/TPU and is skipped on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from phi_jax.attention import xla_attention
from phi_jax.attention_mask import attention_mask, causal_segment_mask
from phi_jax.kernels import flash_attention_tpu
from phi_jax.kernels.flash_attention import BlockSizes, flash_attention
from phi_jax.kernels.flash_attention_common import block_is_visible, causal_first_q_block, causal_num_kv_blocks

# Small blocks so 100..256-token sequences span several blocks; q and k blocks differ on purpose.
GPU_BLOCKS = BlockSizes(block_q=64, block_k=32, block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32)
TPU_BLOCKS = BlockSizes(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=128, block_q_dq=128,
                        block_k_dq=128)
# (atol, rtol) for out and grads vs an fp32 reference on the same (rounded) inputs.
TOL = {jnp.float32: (2e-5, 1e-5), jnp.bfloat16: (3e-2, 3e-2), jnp.float16: (5e-3, 5e-3)}


def _inputs(seed: int, batch: int, seq: int, heads: int, head_dim: int, dtype, packed: bool):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k, v, ct = (jax.random.normal(kk, (batch, seq, heads, head_dim), jnp.float32).astype(dtype)
                   for kk in keys[:4])
    seg = None
    if packed:  # random packed documents: a new segment starts with probability 1/20 at each token
        seg = jnp.cumsum(jax.random.bernoulli(keys[4], 0.05, (batch, seq)), axis=1).astype(jnp.int32)
    return q, k, v, ct, seg


def reference(q, k, v, segment_ids=None, *, causal=True, sm_scale=None):
    """xla_attention under the mask the kernels compute; a non-default sm_scale is folded into q."""
    if sm_scale is not None:
        q = q * (sm_scale * q.shape[-1] ** 0.5)   # xla_attention scales by head_dim ** -0.5
    return xla_attention(q, k, v, causal_segment_mask(segment_ids, q.shape[1], causal=causal))


def _reference_fwd_and_grads(q, k, v, ct, **kw):
    """The reference's out and grads in fp32 at full matmul precision (no TF32 / bf16 passes on a GPU/TPU)."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    with jax.default_matmul_precision("highest"):
        return _fwd_and_grads(functools.partial(reference, **kw), *f32)


def _fwd_and_grads(fn, q, k, v, ct):
    """out and (dq, dk, dv) of the scalar loss sum(out * ct), in one jit."""
    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))
    return jax.jit(run)(q, k, v, ct)


def _check(*, backend, causal, seq, packed, dtype=jnp.float32, head_dim=64, blocks=None, interpret=True,
           batch=1, heads=2, seed=0, sm_scale=None):
    q, k, v, ct, seg = _inputs(seed, batch, seq, heads, head_dim, dtype, packed)
    if sm_scale is not None:  # logits of unit variance at any scale: q.k has variance head_dim before scaling
        q, k = (x * (sm_scale * head_dim**0.5) ** -0.5 for x in (q, k))
    kernel = functools.partial(flash_attention, segment_ids=seg, causal=causal, block_sizes=blocks,
                               backend=backend, interpret=interpret, sm_scale=sm_scale)
    out, grads = _fwd_and_grads(kernel, q, k, v, ct)
    ref_out, ref_grads = _reference_fwd_and_grads(q, k, v, ct, segment_ids=seg, causal=causal, sm_scale=sm_scale)
    assert out.dtype == dtype and out.shape == q.shape
    atol, rtol = TOL[dtype]
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True):
        assert got.dtype == dtype, name
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=atol, rtol=rtol,
                                   err_msg=f"{name} ({backend=}, {causal=}, {seq=}, {packed=}, {dtype=})")


# ------------------------------------------------------------------------------------- GPU-style kernel, interpret
@pytest.mark.parametrize(("causal", "packed", "seq"), [
    (True, False, 128),    # block multiple
    (True, True, 100),     # not a block multiple, packed documents
    (False, False, 100),   # padded keys must be masked even without segment ids
    (False, True, 128),
])
def test_gpu_kernel_fp32(causal, packed, seq):
    _check(backend="gpu", causal=causal, seq=seq, packed=packed, blocks=GPU_BLOCKS)


@pytest.mark.parametrize("seq", [1, pytest.param(17, marks=pytest.mark.slow)])
def test_gpu_kernel_short_sequences(seq):
    _check(backend="gpu", causal=True, seq=seq, packed=True, blocks=GPU_BLOCKS)


# 80 is padded to a power of two inside the wrapper; 128 is covered by the TPU-style test below.
@pytest.mark.parametrize("head_dim", [pytest.param(32, marks=pytest.mark.slow), 80])
def test_gpu_kernel_head_dims(head_dim):
    _check(backend="gpu", causal=True, seq=64, packed=True, head_dim=head_dim, blocks=GPU_BLOCKS, batch=2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_kernel_low_precision(dtype):
    _check(backend="gpu", causal=True, seq=100, packed=True, dtype=dtype, blocks=GPU_BLOCKS)


def test_gpu_kernel_default_blocks_and_sm_scale():
    q, k, v, _, _ = _inputs(1, 1, 70, 2, 64, jnp.float32, False)
    out = flash_attention(q, k, v, sm_scale=0.3)   # backend/interpret/block sizes all defaulted on CPU
    np.testing.assert_allclose(out, reference(q, k, v, sm_scale=0.3), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("sm_scale", [0.125, 1.0, 2.0, 10.0])
def test_gpu_kernel_any_sm_scale_with_segment_ids(sm_scale):
    """Packed documents put fully masked rows in a row's first key block; its masked logit times sm_scale * log2(e)
    must stay finite (MASK_VALUE * scale overflowed to -inf for sm_scale >= ~1, and exp2(-inf - -inf) is NaN)."""
    _check(backend="gpu", causal=True, seq=100, packed=True, blocks=GPU_BLOCKS, sm_scale=sm_scale)


@pytest.mark.parametrize("sm_scale", [-0.5, 0.0, float("inf"), float("nan")])
def test_bad_sm_scale_raises(sm_scale):
    x = jnp.zeros((1, 16, 2, 64), jnp.float32)
    for backend in ("gpu", "tpu"):
        with pytest.raises(ValueError, match="positive finite"):
            flash_attention(x, x, x, sm_scale=sm_scale, backend=backend)


# ------------------------------------------------------------------------------------- TPU-style kernel, interpret
@pytest.mark.parametrize(("causal", "packed", "seq"), [(True, True, 200), (False, False, 256)])
def test_tpu_kernel_fp32(causal, packed, seq):
    _check(backend="tpu", causal=causal, seq=seq, packed=packed, blocks=TPU_BLOCKS)


@pytest.mark.parametrize("sm_scale", [pytest.param(0.125, marks=pytest.mark.slow), 10.0])
def test_tpu_kernel_any_sm_scale_with_segment_ids(sm_scale):
    _check(backend="tpu", causal=True, seq=200, packed=True, blocks=TPU_BLOCKS, sm_scale=sm_scale)


def test_tpu_kernel_bf16_head_dim_128():
    _check(backend="tpu", causal=True, seq=100, packed=False, dtype=jnp.bfloat16, head_dim=128, blocks=TPU_BLOCKS)


# --------------------------------------------------------------------------------------- masking and skipping
@pytest.mark.parametrize(("block_q", "block_k"), [(64, 64), (64, 32), (32, 64), (128, 16)])
def test_causal_block_bounds_match_brute_force(block_q, block_k):
    """The loop bounds and `pl.when` predicate visit exactly the blocks holding an unmasked (q >= k) pair."""
    seq = 256
    nq, nk = seq // block_q, seq // block_k
    visible = np.zeros((nq, nk), bool)
    for i in range(nq):
        for j in range(nk):
            visible[i, j] = any(qp >= kp for qp in range(i * block_q, (i + 1) * block_q)
                                for kp in range(j * block_k, (j + 1) * block_k))
    for i in range(nq):
        assert causal_num_kv_blocks(i, block_q, block_k, nk) == visible[i].sum()
        assert int(causal_num_kv_blocks(jnp.int32(i), block_q, block_k, nk)) == visible[i].sum()
        assert [bool(block_is_visible(i, block_q, j, block_k)) for j in range(nk)] == list(visible[i])
    for j in range(nk):
        assert causal_first_q_block(j, block_k, block_q) == np.argmax(visible[:, j])
        assert int(causal_first_q_block(jnp.int32(j), block_k, block_q)) == np.argmax(visible[:, j])
    assert visible.sum() < nq * nk  # upper blocks exist, so skipping saves work


@pytest.mark.parametrize(("backend", "block", "seq"), [("gpu", 64, 128),
                                                       pytest.param("tpu", 128, 256, marks=pytest.mark.slow)])
def test_fully_masked_blocks_are_never_read(backend, block, seq):
    """NaN planted where only skipped (fully masked) blocks would read it must not reach the results:
    a masked-but-computed block gives 0 * NaN = NaN."""
    blocks = BlockSizes(*(block,) * 6)
    q, k, v, ct, _ = _inputs(3, 1, seq, 2, 64, jnp.float32, False)
    fn = functools.partial(flash_attention, causal=True, block_sizes=blocks, backend=backend)
    # Forward and dq: query block 0 must not touch key block 1.
    v_bad = v.at[:, block:].set(jnp.nan)
    out, (dq, _, _) = _fwd_and_grads(fn, q, k, v_bad, ct)
    ref_out, (ref_dq, ref_dk, ref_dv) = _reference_fwd_and_grads(q, k, v, ct, causal=True)
    np.testing.assert_allclose(out[:, :block], ref_out[:, :block], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dq[:, :block], ref_dq[:, :block], atol=2e-5, rtol=1e-5)
    # dk/dv: key block 1 must not touch query block 0 (whose rows, and so delta, are NaN here).
    _, (_, dk, dv) = _fwd_and_grads(fn, q.at[:, :block].set(jnp.nan), k, v, ct)
    np.testing.assert_allclose(dk[:, block:], ref_dk[:, block:], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dv[:, block:], ref_dv[:, block:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("interpret", [True, pltpu.InterpretParams()], ids=["gpu-style", "tpu-style"])
def test_interpret_poisons_outputs(interpret):
    """Premise of the comparisons above: an output element no kernel writes comes back NaN in interpret mode."""
    def writes_first_half(x_ref, o_ref):
        o_ref[:8, :] = x_ref[:8, :]
    out = pl.pallas_call(writes_first_half, out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
                         interpret=interpret)(jnp.ones((16, 128), jnp.float32))
    assert bool(jnp.all(out[:8] == 1.0)) and bool(jnp.all(jnp.isnan(out[8:])))


# ------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(("shape", "dtype", "match"), [
    ((1, 16, 2, 40), jnp.float32, "head_dim=40"),
    ((1, 16, 2, 16), jnp.float32, "head_dim=16"),
    ((1, 16, 2, 512), jnp.float32, "head_dim=512"),
    ((1, 16, 64), jnp.float32, "batch, seq, heads, head_dim"),
    ((1, 16, 2, 64), jnp.int32, "dtype"),
])
def test_bad_inputs_raise(shape, dtype, match):
    x = jnp.zeros(shape, dtype)
    with pytest.raises(ValueError, match=match):
        flash_attention(x, x, x)


def test_bad_arguments_raise():
    x = jnp.zeros((1, 16, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="one shape"):
        flash_attention(x, jnp.zeros((1, 8, 2, 64)), x)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(x, x.astype(jnp.bfloat16), x)
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(x, x, x, jnp.zeros((1, 15), jnp.int32))
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(x, x, x, block_sizes=BlockSizes(block_q=48))
    with pytest.raises(ValueError, match="power of two >= 128"):
        flash_attention(x, x, x, block_sizes=BlockSizes(), backend="tpu")
    with pytest.raises(ValueError, match="lowering"):
        flash_attention(x, x, x, backend="cuda")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            flash_attention(x, x, x, interpret=False)


# ------------------------------------------------------------------------------------ compiled, GPU/TPU only
@pytest.mark.accelerator
@pytest.mark.skipif(jax.default_backend() == "cpu", reason="compiled Pallas kernels need a GPU or TPU")
class TestCompiled:
    """The same comparisons compiled for this platform's lowering with its default block sizes."""

    @pytest.mark.parametrize(("causal", "packed", "seq"), [(True, False, 512), (True, True, 1000),
                                                           (False, True, 300), (True, True, 1)])
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_matches_reference(self, causal, packed, seq, dtype):
        _check(backend=None, causal=causal, seq=seq, packed=packed, dtype=dtype, interpret=False, batch=2)

    @pytest.mark.parametrize("head_dim", [32, 80, 128, 256])
    def test_head_dims(self, head_dim):
        _check(backend=None, causal=True, seq=384, packed=True, head_dim=head_dim, dtype=jnp.bfloat16,
               interpret=False)


# ------------------------------------------------------------------------ cross-platform lowering (no device)
@pytest.mark.parametrize(("backend", "platform"), [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize(("head_dim", "dtype"), [(64, jnp.bfloat16), (80, jnp.float32)])
def test_lowers_for_accelerator(backend, platform, head_dim, dtype):
    """Forward and backward lower (Pallas -> Triton IR / Mosaic MLIR, done in Python) for a GPU/TPU from this CPU
    host, the platform named explicitly. This checks block shapes and that every primitive has a
    lowering rule; it does not run the Triton or Mosaic compilers (those ship with the GPU/TPU runtimes)."""
    x = jax.ShapeDtypeStruct((2, 1000, 4, head_dim), dtype)
    seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32)

    def loss(q, k, v, seg):
        return jnp.sum(flash_attention(q, k, v, seg, causal=True, platform=backend).astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x, seg).lower(
        lowering_platforms=(platform,)).as_text()
    for name in ("fwd", "dkv", "dq"):
        assert f"flash_attention_{name}_{backend}" in text


# ------------------------------------------------------------------- GPU loops: unmasked interior, masked rest
def _documents(lengths, batch=1):
    """Segment ids for documents of the given lengths laid end to end; ids may repeat (non-contiguous)."""
    ids = np.concatenate([np.full(n, i) for i, n in lengths])
    return jnp.asarray(np.tile(ids, (batch, 1)), jnp.int32)


DOCS = {  # (segment id, length) runs
    "long-documents": [(0, 100), (1, 130), (2, 26)],      # interior blocks exist inside each long document
    "repeated-id": [(0, 64), (1, 64), (0, 128)],          # id 0 again after id 1: interior run is not unique
}


@pytest.mark.parametrize("docs", list(DOCS))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("per_key_block", [False, True])
def test_loop_bounds_cover_every_visible_block(docs, causal, per_key_block):
    """[lo, hi) holds every block with a visible pair; [ulo, uhi) only blocks whose mask is all-true (checked
    against the [S, S] mask); some blocks take the unmasked loop and some the masked one."""
    from phi_jax.kernels.flash_attention_gpu import loop_bounds

    seg = _documents(DOCS[docs])
    seq, bq, bk = seg.shape[1], 32, 64
    mask = np.asarray(causal_segment_mask(seg, seq, causal=causal)[0])
    blocks = mask.reshape(seq // bq, bq, seq // bk, bk).transpose(0, 2, 1, 3)   # [nq, nk, bq, bk]
    any_vis, all_vis = blocks.any((2, 3)), blocks.all((2, 3))
    if per_key_block:
        any_vis, all_vis = any_vis.T, all_vis.T
    bounds = np.asarray(loop_bounds(seg, seq, block_q=bq, block_k=bk, causal=causal, per_key_block=per_key_block))
    interior_used = masked_used = 0
    for row, (lo, ulo, uhi, hi) in enumerate(bounds[0]):
        assert lo <= ulo <= uhi <= hi
        visited = set(range(lo, hi))
        assert set(np.flatnonzero(any_vis[row])) <= visited, (row, lo, hi)
        assert all(all_vis[row, j] for j in range(ulo, uhi)), (row, ulo, uhi)
        interior_used += uhi - ulo
        masked_used += (ulo - lo) + (hi - uhi)
    assert interior_used and masked_used


@pytest.mark.parametrize("docs", list(DOCS))
def test_gpu_kernel_interior_and_masked_loops(docs):
    """Outputs and grads vs the reference where both loops run: long packed documents, and a repeated id."""
    q, k, v, ct, _ = _inputs(4, 1, 256, 2, 64, jnp.float32, False)
    seg = _documents(DOCS[docs])
    blocks = BlockSizes(block_q=32, block_k=64, block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32)
    kernel = functools.partial(flash_attention, segment_ids=seg, causal=True, block_sizes=blocks, backend="gpu")
    out, grads = _fwd_and_grads(kernel, q, k, v, ct)
    ref_out, ref_grads = _reference_fwd_and_grads(q, k, v, ct, segment_ids=seg, causal=True)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------------- one mask
def _mask_by_definition(q_seg: np.ndarray, kv_seg: np.ndarray, q_start: int, causal: bool) -> np.ndarray:
    """[T, S]: query t (at position q_start + t) sees key s when s is not later (if causal) and in its segment."""
    return np.array([[(not causal or s <= q_start + t) and q_seg[t] == kv_seg[s] for s in range(len(kv_seg))]
                     for t in range(len(q_seg))])


def test_segment_ids_on_one_side_only_are_an_error():
    """Comparing ids with None would give a scalar False: a mask that hides every key, silently."""
    ids = jnp.ones((4, 1), jnp.int32)
    for q_ids, kv_ids in ((ids, None), (None, ids.T)):
        with pytest.raises(ValueError, match="both the queries and the keys, or for neither"):
            attention_mask((4, 4), causal=True, q_segment_ids=q_ids, kv_segment_ids=kv_ids)


@pytest.mark.parametrize("causal", [True, False])
def test_every_mask_form_is_the_xla_mask(causal):
    """One mask builder (phi_jax.attention_mask) serves every path: XLA attention's [S, S] mask equals the definition
    written out in numpy, and every block form the kernels build (the GPU kernels' [q, k] tiles and transposed
    [k, q] tiles; the TPU kernels' tiles from their lane- and sublane-broadcast segment layouts, both orientations)
    equals the same block of it. Random segment ids, an id repeated after another, blocks at every offset."""
    rng = np.random.default_rng(7)
    seq, bq, bk = 256, 64, 128
    seg = np.cumsum(rng.random(seq) < 0.05).astype(np.int32)
    seg[200:] = seg[0]                                       # an id that reappears (non-contiguous document)
    full = np.asarray(causal_segment_mask(jnp.asarray(seg)[None], seq, causal=causal)[0])
    np.testing.assert_array_equal(full, _mask_by_definition(seg, seg, 0, causal))
    for qs in range(0, seq, bq):
        for ks in range(0, seq, bk):
            want = full[qs:qs + bq, ks:ks + bk]
            q_seg, k_seg = jnp.asarray(seg[qs:qs + bq]), jnp.asarray(seg[ks:ks + bk])
            forms = {
                "gpu [q, k]": attention_mask((bq, bk), causal=causal, q_start=qs, k_start=ks,
                                             q_segment_ids=q_seg[:, None], kv_segment_ids=k_seg[None, :]),
                "gpu [k, q]": attention_mask((bk, bq), causal=causal, q_start=qs, k_start=ks,
                                             q_segment_ids=q_seg[None, :], kv_segment_ids=k_seg[:, None],
                                             keys_on_rows=True).T,
                "tpu [q, k]": flash_attention_tpu._mask(
                    jnp.broadcast_to(q_seg[:, None], (bq, 128)), jnp.broadcast_to(k_seg[None, :], (8, bk)),
                    jnp.int32(qs), jnp.int32(ks), (bq, bk), causal),
                "tpu [k, q]": flash_attention_tpu._mask(
                    jnp.broadcast_to(k_seg[:, None], (bk, 128)), jnp.broadcast_to(q_seg[None, :], (8, bq)),
                    jnp.int32(qs), jnp.int32(ks), (bk, bq), causal, keys_on_rows=True).T,
            }
            for name, got in forms.items():
                np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{name} at ({qs}, {ks})")


def test_cache_mask_with_a_traced_offset_is_the_definition():
    """The KV-cache form: queries at slots q_start + t against a cache's segment ids (0 = empty), q_start traced."""
    rng = np.random.default_rng(8)
    q_seg, kv_seg = rng.integers(1, 3, (2, 5)).astype(np.int32), rng.integers(0, 3, (2, 16)).astype(np.int32)
    mask = jax.jit(lambda q, kv, start: causal_segment_mask(q, 5, kv_segment_ids=kv, q_start=start))(
        q_seg, kv_seg, jnp.int32(6))
    for b in range(2):
        np.testing.assert_array_equal(np.asarray(mask[b]), _mask_by_definition(q_seg[b], kv_seg[b], 6, True))
