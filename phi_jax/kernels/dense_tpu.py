"""TPU (Mosaic) lowering of the fused dense kernels: forward, dx and dw(+db).

The blocked matmul of the Pallas TPU guide (docs.jax.dev/en/latest/pallas/tpu/matmul.html): a 3-D grid
(rows, cols, contraction) with the contraction axis last and "arbitrary" (sequential), so the output tile
stays resident in VMEM while Pallas double-buffers the input tiles from HBM. An fp32 VMEM scratch holds the
accumulator; it is zeroed on the first contraction step and the epilogue (bias, gelu_new, cast) runs on the
last one.

Callers (phi_jax.kernels.dense) pass shapes already padded to block multiples and blocks whose last two
dims are multiples of (8, 128) (16 sublanes for 16-bit dtypes).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from phi_jax.activations import activation_grad, apply_activation

_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _interpret(interpret: bool):
    # On CPU the Mosaic kernels run under the TPU interpreter, which simulates VMEM scratch and the
    # grid's sequential semantics (plain interpret=True would not model the TPU memory spaces).
    return pltpu.InterpretParams() if interpret else False


# ----------------------------------------------------------------------------------------------- forward
def _fwd_kernel(x_ref, w_ref, b_ref, *refs, activation: str | None):
    # x_ref [bm, bk], w_ref [bk, bn], b_ref [1, bn] fp32 -> y_ref [bm, bn] (+ z_ref); acc_ref [bm, bn] fp32
    *out_refs, acc_ref = refs
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        z = acc_ref[...] + b_ref[...]
        out_refs[0][...] = apply_activation(z, activation).astype(out_refs[0].dtype)
        if len(out_refs) == 2:
            out_refs[1][...] = z.astype(out_refs[1].dtype)


def forward(x, w, b, *, block_m, block_n, block_k, activation, save_preactivation, interpret, **_):
    """y = act(x @ w + b) [M, N] (and z when save_preactivation); x [M, K], w [K, N], b [1, N] fp32."""
    (m, k), n = x.shape, w.shape[1]
    out = jax.ShapeDtypeStruct((m, n), x.dtype)
    n_out = 2 if save_preactivation else 1
    out_spec = pl.BlockSpec((block_m, block_n), lambda i, j, kk: (i, j))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, activation=activation),
        out_shape=(out,) * n_out,
        grid=(m // block_m, n // block_n, k // block_k),
        in_specs=[
            pl.BlockSpec((block_m, block_k), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((block_k, block_n), lambda i, j, kk: (kk, j)),
            pl.BlockSpec((1, block_n), lambda i, j, kk: (0, j)),
        ],
        out_specs=(out_spec,) * n_out,
        scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * n * k, transcendentals=m * n if activation else 0,
            bytes_accessed=(m * k + k * n + n_out * m * n) * x.dtype.itemsize),
        interpret=_interpret(interpret),
        name="fused_dense_fwd",
    )(x, w, b)


# ------------------------------------------------------------------------------------------- backward dx
def _dx_kernel(dy_ref, z_ref, w_ref, dx_ref, acc_ref, *, activation: str | None):
    # dy_ref, z_ref [bm, bn]; w_ref [bk, bn] -> dx_ref [bm, bk]; acc_ref [bm, bk] fp32
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    z = z_ref[...].astype(jnp.float32) if activation else None
    # Prologue: dz = dy * gelu_new'(z) in fp32, cast to the matmul input dtype for the MXU.
    dz = activation_grad(dy_ref[...].astype(jnp.float32), z, activation).astype(w_ref.dtype)
    acc_ref[...] += jax.lax.dot_general(dz, w_ref[...], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)


def backward_dx(dy, z, w, *, block_m, block_n, block_k, activation, interpret, **_):
    """dx [M, K] = (dy * act'(z)) @ w.T; dy, z [M, N], w [K, N]."""
    (m, n), k = dy.shape, w.shape[0]
    tile = pl.BlockSpec((block_m, block_n), lambda i, j, nn: (i, nn))
    in_specs = [tile, tile] if activation else [tile, pl.BlockSpec((block_m, block_n), lambda i, j, nn: (0, 0))]
    return pl.pallas_call(
        functools.partial(_dx_kernel, activation=activation),
        out_shape=jax.ShapeDtypeStruct((m, k), w.dtype),
        grid=(m // block_m, k // block_k, n // block_n),
        in_specs=[*in_specs, pl.BlockSpec((block_k, block_n), lambda i, j, nn: (j, nn))],
        out_specs=pl.BlockSpec((block_m, block_k), lambda i, j, nn: (i, j)),
        scratch_shapes=[pltpu.VMEM((block_m, block_k), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * n * k, transcendentals=(m * n * (k // block_k)) if activation else 0,
            bytes_accessed=(3 * m * n + k * n + m * k) * w.dtype.itemsize),
        interpret=_interpret(interpret),
        name="fused_dense_bwd_dx",
    )(dy, z, w)


# ------------------------------------------------------------------------------------------- backward dw
def _dw_kernel(x_ref, dy_ref, z_ref, dw_ref, db_ref, acc_ref, db_acc_ref, *, activation: str | None):
    # x_ref [bm, bk]; dy_ref, z_ref [bm, bn] -> dw_ref [bk, bn], db_ref [1, bn] fp32; scratch fp32 accumulators
    m = pl.program_id(2)

    @pl.when(m == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        db_acc_ref[...] = jnp.zeros_like(db_acc_ref)

    z = z_ref[...].astype(jnp.float32) if activation else None
    dz = activation_grad(dy_ref[...].astype(jnp.float32), z, activation)
    x = x_ref[...]
    acc_ref[...] += jax.lax.dot_general(x, dz.astype(x.dtype), (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)
    db_acc_ref[...] += jnp.sum(dz, axis=0, keepdims=True)

    @pl.when(m == pl.num_programs(2) - 1)
    def _():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)
        # Every row-block i computes the same db[j]. Mosaic forbids revisiting an output block from a
        # non-consecutive grid step, so each i stores its copy into its own row of db [K/bk, 1, N].
        db_ref[...] = db_acc_ref[...]


def backward_dw(x, dy, z, *, block_m, block_n, block_k, activation, interpret, **_):
    """dw [K, N] = x.T @ dz and db [1, N] (fp32) = sum_m dz; x [M, K], dy, z [M, N]."""
    (m, k), n = x.shape, dy.shape[1]
    tile = pl.BlockSpec((block_m, block_n), lambda i, j, mm: (mm, j))
    z_spec = tile if activation else pl.BlockSpec((block_m, block_n), lambda i, j, mm: (0, 0))
    dw, db = pl.pallas_call(
        functools.partial(_dw_kernel, activation=activation),
        out_shape=(jax.ShapeDtypeStruct((k, n), x.dtype),
                   jax.ShapeDtypeStruct((k // block_k, 1, n), jnp.float32)),
        grid=(k // block_k, n // block_n, m // block_m),
        in_specs=[pl.BlockSpec((block_m, block_k), lambda i, j, mm: (mm, i)), tile, z_spec],
        out_specs=(pl.BlockSpec((block_k, block_n), lambda i, j, mm: (i, j)),
                   pl.BlockSpec((None, 1, block_n), lambda i, j, mm: (i, 0, j))),
        scratch_shapes=[pltpu.VMEM((block_k, block_n), jnp.float32), pltpu.VMEM((1, block_n), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * n * k, transcendentals=(m * n * (k // block_k)) if activation else 0,
            bytes_accessed=(m * k + 2 * m * n + k * n) * x.dtype.itemsize + 4 * n * (k // block_k)),
        interpret=_interpret(interpret),
        name="fused_dense_bwd_dw",
    )(x, dy, z)
    return dw, db[0]
