"""GPU (Triton) lowering of the fused dense kernels: forward, dx and dw(+db).

Each program owns one [block_rows, block_cols] output tile and walks the contraction dimension in a
`fori_loop` with an fp32 accumulator in registers (the classic Triton matmul, Tillet et al. 2019, and the
"Matrix Multiplication" Triton tutorial). The refs handed to a program span the whole contraction
dimension; the loop slices `block_k`-wide pieces out of them with `pl.ds`, which the Triton lowering turns
into pointer arithmetic, so only the [block, block] tiles are ever loaded.

The backward kernels can form dz = dy * act'(z) in their prologue, but phi_jax.kernels.dense calls them with
activation=None on a dz it formed once (recomputing act'(z) per k-step cost ~100 PTX instructions per element
and spilled; docs/KERNELS.md). Callers (phi_jax.kernels.dense) pass shapes already padded to block multiples
and blocks that are powers of two >= 16 (Triton needs power-of-two tensor sizes for loads, stores and `tl.dot`).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from phi_jax.activations import activation_grad, apply_activation


def _compiler_params(num_warps: int, num_stages: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------- forward
def _fwd_kernel(x_ref, w_ref, b_ref, *out_refs, block_k: int, activation: str | None):
    # x_ref [bm, K], w_ref [K, bn], b_ref [1, bn] fp32 -> y_ref [bm, bn] (+ z_ref [bm, bn])
    num_k = x_ref.shape[1] // block_k

    def body(kk, acc):
        start = pl.multiple_of(kk * block_k, block_k)
        x = x_ref[:, pl.ds(start, block_k)]
        w = w_ref[pl.ds(start, block_k), :]
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jnp.zeros((x_ref.shape[0], w_ref.shape[1]), jnp.float32)
    z = jax.lax.fori_loop(0, num_k, body, acc) + b_ref[...].astype(jnp.float32)
    # Epilogue in fp32: bias add (above) and the activation, then one cast on store.
    out_refs[0][...] = apply_activation(z, activation).astype(out_refs[0].dtype)
    if len(out_refs) == 2:
        out_refs[1][...] = z.astype(out_refs[1].dtype)


def forward(x, w, b, *, block_m, block_n, block_k, activation, save_preactivation, num_warps, num_stages,
            interpret):
    """y = act(x @ w + b) [M, N] (and z = x @ w + b when save_preactivation); x [M, K], w [K, N], b [1, N] fp32."""
    (m, k), n = x.shape, w.shape[1]
    out = jax.ShapeDtypeStruct((m, n), x.dtype)
    n_out = 2 if save_preactivation else 1
    out_spec = pl.BlockSpec((block_m, block_n), lambda i, j: (i, j))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, block_k=block_k, activation=activation),
        out_shape=(out,) * n_out,
        grid=(m // block_m, n // block_n),
        in_specs=[
            pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
            pl.BlockSpec((k, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((1, block_n), lambda i, j: (0, j)),
        ],
        out_specs=(out_spec,) * n_out,
        compiler_params=_compiler_params(num_warps, num_stages),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * n * k, transcendentals=m * n if activation else 0,
            bytes_accessed=(m * k + k * n + n_out * m * n) * x.dtype.itemsize),
        interpret=interpret,
        name="fused_dense_fwd",
    )(x, w, b)


# ------------------------------------------------------------------------------------------- backward dx
def _dx_kernel(dy_ref, z_ref, w_ref, dx_ref, *, block_n: int, activation: str | None):
    # dy_ref, z_ref [bm, N]; w_ref [bk, N] -> dx_ref [bm, bk] = sum_n dz[:, n] w[:, n]^T
    num_n = dy_ref.shape[1] // block_n

    def body(nn, acc):
        start = pl.multiple_of(nn * block_n, block_n)
        dy = dy_ref[:, pl.ds(start, block_n)].astype(jnp.float32)
        z = z_ref[:, pl.ds(start, block_n)].astype(jnp.float32) if activation else None
        # Prologue: dz = dy * gelu_new'(z) in fp32, cast to the matmul input dtype for the tensor cores.
        dz = activation_grad(dy, z, activation).astype(w_ref.dtype)
        w = w_ref[:, pl.ds(start, block_n)]
        return acc + jax.lax.dot_general(dz, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jnp.zeros(dx_ref.shape, jnp.float32)
    dx_ref[...] = jax.lax.fori_loop(0, num_n, body, acc).astype(dx_ref.dtype)


def backward_dx(dy, z, w, *, block_m, block_n, block_k, activation, num_warps, num_stages, interpret):
    """dx [M, K] = (dy * act'(z)) @ w.T; dy, z [M, N] (z unused without activation), w [K, N]."""
    (m, n), k = dy.shape, w.shape[0]
    row_spec = pl.BlockSpec((block_m, n), lambda i, j: (i, 0))
    return pl.pallas_call(
        functools.partial(_dx_kernel, block_n=block_n, activation=activation),
        out_shape=jax.ShapeDtypeStruct((m, k), w.dtype),
        grid=(m // block_m, k // block_k),
        in_specs=[row_spec, row_spec, pl.BlockSpec((block_k, n), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((block_m, block_k), lambda i, j: (i, j)),
        compiler_params=_compiler_params(num_warps, num_stages),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * n * k, transcendentals=(m * n * (k // block_k)) if activation else 0,
            bytes_accessed=(3 * m * n + k * n + m * k) * w.dtype.itemsize),
        interpret=interpret,
        name="fused_dense_bwd_dx",
    )(dy, z, w)


# ------------------------------------------------------------------------------------------- backward dw
def _dw_kernel(x_ref, dy_ref, z_ref, dw_ref, db_ref, *, block_m: int, activation: str | None):
    # x_ref [M, bk]; dy_ref, z_ref [M, bn] -> dw_ref [bk, bn] = sum_m x[m]^T dz[m]; db_ref [1, bn] = sum_m dz[m]
    num_m = x_ref.shape[0] // block_m

    def body(mm, carry):
        acc, db = carry
        start = pl.multiple_of(mm * block_m, block_m)
        dy = dy_ref[pl.ds(start, block_m), :].astype(jnp.float32)
        z = z_ref[pl.ds(start, block_m), :].astype(jnp.float32) if activation else None
        dz = activation_grad(dy, z, activation)
        x = x_ref[pl.ds(start, block_m), :]
        acc = acc + jax.lax.dot_general(x, dz.astype(x.dtype), (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)
        return acc, db + jnp.sum(dz, axis=0, keepdims=True)  # db from the fp32 dz, before the cast

    init = (jnp.zeros(dw_ref.shape, jnp.float32), jnp.zeros(db_ref.shape, jnp.float32))
    acc, db = jax.lax.fori_loop(0, num_m, body, init)
    dw_ref[...] = acc.astype(dw_ref.dtype)

    # Every program of column j computes the same db[j]; only the first row of programs stores it.
    @pl.when(pl.program_id(0) == 0)
    def _():
        db_ref[...] = db


def backward_dw(x, dy, z, *, block_m, block_n, block_k, activation, num_warps, num_stages, interpret):
    """dw [K, N] = x.T @ dz and db [1, N] (fp32) = sum_m dz; x [M, K], dy, z [M, N]."""
    (m, k), n = x.shape, dy.shape[1]
    col_spec = pl.BlockSpec((m, block_n), lambda i, j: (0, j))
    return pl.pallas_call(
        functools.partial(_dw_kernel, block_m=block_m, activation=activation),
        out_shape=(jax.ShapeDtypeStruct((k, n), x.dtype), jax.ShapeDtypeStruct((1, n), jnp.float32)),
        grid=(k // block_k, n // block_n),
        in_specs=[pl.BlockSpec((m, block_k), lambda i, j: (0, i)), col_spec, col_spec],
        out_specs=(pl.BlockSpec((block_k, block_n), lambda i, j: (i, j)),
                   pl.BlockSpec((1, block_n), lambda i, j: (0, j))),
        compiler_params=_compiler_params(num_warps, num_stages),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * n * k, transcendentals=(m * n * (k // block_k)) if activation else 0,
            bytes_accessed=(m * k + 2 * m * n + k * n) * x.dtype.itemsize + 4 * n),
        interpret=interpret,
        name="fused_dense_bwd_dw",
    )(x, dy, z)
