"""Fused dense layer: y = act(x @ w + b) as one Pallas matmul with the bias and gelu_new in its epilogue.

Forward: one kernel, fp32 accumulation, bias add + gelu_new in fp32 on the accumulator, one cast on store.
Backward (`jax.custom_vjp`): the forward saves x, w and the pre-activation z = x @ w + b (only when the
activation is gelu_new; stored in x.dtype). Saving z costs one [M, N] activation but avoids a third matmul
in the backward pass, the same trade XLA makes when it autodiffs the unfused layer. The backward forms
dz = dy * gelu_new'(z) once, in one XLA elementwise pass (fp32 math, stored in x.dtype), then runs two plain
GEMM kernels:

  dx = dz @ w.T
  dw = x.T @ dz, db = sum_m dz       (db accumulated in fp32 in the same loop)

Forming dz inside the GEMMs instead would recompute gelu_new'(z) in every k-step of both loops, spill
registers and need 208 KiB of shared memory for fc1's dw (docs/KERNELS.md has the figures).
Lowerings: `dense_gpu` (Triton) and `dense_tpu` (Mosaic); on CPU either one runs
in Pallas interpret mode. Shapes that are not block multiples are zero-padded here and sliced back (zero
rows/columns of x and w contribute nothing; padded dy is zero, so padded dz is zero too).
"""

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from phi_jax.activations import activation_grad, apply_activation
from phi_jax.dispatch import default_platform, pallas_target
from phi_jax.kernels import dense_gpu, dense_tpu

__all__ = ["BlockSizes", "dense_reference", "fused_dense"]

Backend = Literal["gpu", "tpu"]
_ACTIVATIONS = (None, "gelu_new")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the [M, K] @ [K, N] forward; the backward reuses them (dx: M x K tiles looping over
    block_n, dw: K x N tiles looping over block_m). num_warps/num_stages only matter to the GPU lowering.

    Blocks larger than the (rounded-up) problem are shrunk to fit, so small layers do not pad to 128.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def default(cls, backend: Backend) -> "BlockSizes":
        if backend == "tpu":
            # 512^2 tiles: bf16 inputs double-buffered + fp32 accumulator ~ 4 MiB of VMEM, inside the
            # 16 MiB scoped default of v5e and the 32 MiB of v4/v5p/v6e (Pallas TPU matmul guide).
            return cls(block_m=512, block_n=512, block_k=512)
        # 128x128 output tile, 64-wide K steps, 3 pipeline stages (the standard Triton bf16 matmul tile) on
        # 8 warps: with 4 the forward spills registers on sm_80 and sm_90a (tools/ptx_stats.py; docs/KERNELS.md).
        return cls(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


def dense_reference(x: jax.Array, w: jax.Array, b: jax.Array, activation: str | None = None) -> jax.Array:
    """Plain-jnp fp32 reference: act(x @ w + b), returned in fp32. x [..., K], w [K, N], b [N]."""
    z = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return apply_activation(z + b.astype(jnp.float32), activation)


# ------------------------------------------------------------------------------------------- validation
def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _fit_blocks(blocks: BlockSizes, backend: Backend, m: int, k: int, n: int, dtype) -> BlockSizes:
    """Checks block sizes against the lowering's tiling rules, then shrinks them to the problem size."""
    dims = {"block_m": m, "block_n": n, "block_k": k}
    if backend == "gpu":
        for name in dims:
            v = getattr(blocks, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16 for the GPU (Triton) lowering.")
        out = {name: min(getattr(blocks, name), max(16, _next_pow2(dim))) for name, dim in dims.items()}
    else:
        sublane = 8 * 4 // jnp.dtype(dtype).itemsize  # a vreg holds 8 rows of 32-bit or 16 rows of 16-bit
        multiples = {"block_m": sublane, "block_n": 128, "block_k": 128}
        for name, multiple in multiples.items():
            v = getattr(blocks, name)
            if v <= 0 or v % multiple:
                raise ValueError(f"{name}={v} must be a positive multiple of {multiple} for the TPU (Mosaic) "
                                 f"lowering with {jnp.dtype(dtype).name} inputs (TPU tiles are (8, 128) of 32-bit).")
        out = {name: min(getattr(blocks, name), _round_up(dim, multiples[name])) for name, dim in dims.items()}
    return dataclasses.replace(blocks, **out)


def _validate(x, w, b, activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {_ACTIVATIONS}.")
    if x.ndim < 1 or w.ndim != 2 or b.ndim != 1:
        raise ValueError(f"expected x [..., K], w [K, N], b [N]; got x.shape={x.shape}, w.shape={w.shape}, "
                         f"b.shape={b.shape}.")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x.shape[-1]={x.shape[-1]} must equal w.shape[0]={w.shape[0]} (the contraction dim K).")
    if b.shape[0] != w.shape[1]:
        raise ValueError(f"b.shape[0]={b.shape[0]} must equal w.shape[1]={w.shape[1]} (the output dim N).")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not supported; use one of {[d.name for d in _DTYPES]}.")
    if w.dtype != x.dtype:
        raise ValueError(f"w.dtype={w.dtype} must equal x.dtype={x.dtype}; cast the kernel to the compute dtype.")
    if not jnp.issubdtype(b.dtype, jnp.floating):
        raise ValueError(f"b.dtype={b.dtype} must be a floating dtype.")


# ------------------------------------------------------------------------------------------- custom_vjp
@dataclasses.dataclass(frozen=True)
class _Config:
    activation: str | None
    backend: Backend
    blocks: BlockSizes
    interpret: bool

    def kwargs(self) -> dict:
        return dict(block_m=self.blocks.block_m, block_n=self.blocks.block_n, block_k=self.blocks.block_k,
                    activation=self.activation, num_warps=self.blocks.num_warps,
                    num_stages=self.blocks.num_stages, interpret=self.interpret)

    @property
    def lowering(self):
        return dense_tpu if self.backend == "tpu" else dense_gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_dense_padded(x, w, b, cfg: _Config):
    # x [Mp, Kp], w [Kp, Np], b [1, Np] fp32, all block multiples -> y [Mp, Np] in x.dtype
    (y,) = cfg.lowering.forward(x, w, b, save_preactivation=False, **cfg.kwargs())
    return y


def _fwd(x, w, b, cfg: _Config):
    if cfg.activation is None:
        (y,) = cfg.lowering.forward(x, w, b, save_preactivation=False, **cfg.kwargs())
        return y, (x, w, None)
    y, z = cfg.lowering.forward(x, w, b, save_preactivation=True, **cfg.kwargs())
    return y, (x, w, z)


def _bwd(cfg: _Config, res, dy):
    x, w, z = res
    dz = dy
    if z is not None:
        # dz = dy * act'(z) once, in one XLA elementwise pass (fp32 math, stored in the compute dtype), so the
        # kernels below are plain GEMMs: no activation math in every k-step of the dx and dw loops.
        dz = activation_grad(dy.astype(jnp.float32), z.astype(jnp.float32), cfg.activation).astype(dy.dtype)
    plain = dataclasses.replace(cfg, activation=None).kwargs()
    dx = cfg.lowering.backward_dx(dz, dz, w, **plain)  # z is not read without an activation
    dw, db = cfg.lowering.backward_dw(x, dz, dz, **plain)
    return dx, dw, db


_fused_dense_padded.defvjp(_fwd, _bwd)


# ------------------------------------------------------------------------------------------- public API
def fused_dense(x: jax.Array, w: jax.Array, b: jax.Array, *, activation: str | None = None,
                block_sizes: BlockSizes | None = None, backend: Backend | None = None,
                interpret: bool | None = None, platform: str | None = None) -> jax.Array:
    """act(x @ w + b) in x.dtype, fp32 accumulation and epilogue; x [..., K], w [K, N], b [N] -> [..., N].

    backend: 'gpu' (Triton) or 'tpu' (Mosaic); interpret: Pallas interpret mode. None resolves both for `platform`,
    where this runs ("cpu", "gpu", "tpu"; None: JAX's default backend; phi_jax.dispatch.pallas_target): its own
    lowering, compiled; on CPU the GPU-style one, interpreted.
    """
    _validate(x, w, b, activation)
    backend, interpret = pallas_target(platform or default_platform(), backend, interpret)
    return _fused_dense(x, w, b, activation=activation, block_sizes=block_sizes, backend=backend,
                        interpret=interpret)


@functools.partial(jax.jit, static_argnames=("activation", "block_sizes", "backend", "interpret"))
def _fused_dense(x, w, b, *, activation, block_sizes, backend: Backend, interpret: bool):
    *batch_shape, k = x.shape
    n = w.shape[1]
    x2 = x.reshape(-1, k)  # [M, K]
    m = x2.shape[0]
    if m == 0 or n == 0 or k == 0:  # nothing to tile: an empty sum is zero, so y = act(b)
        y = apply_activation(b.astype(jnp.float32), activation) * jnp.ones((m, 1), jnp.float32)
        return y.astype(x.dtype).reshape(*batch_shape, n)
    blocks = _fit_blocks(block_sizes or BlockSizes.default(backend), backend, m, k, n, x.dtype)
    mp, kp, np_ = _round_up(m, blocks.block_m), _round_up(k, blocks.block_k), _round_up(n, blocks.block_n)
    # Zero padding up to block multiples (a no-op at phi-1.5 shapes); autodiff slices the cotangents back.
    xp = jnp.pad(x2, ((0, mp - m), (0, kp - k)))
    wp = jnp.pad(w, ((0, kp - k), (0, np_ - n)))
    bp = jnp.pad(b.astype(jnp.float32), (0, np_ - n)).reshape(1, np_)
    cfg = _Config(activation=activation, backend=backend, blocks=blocks, interpret=interpret)
    y = _fused_dense_padded(xp, wp, bp, cfg)[:m, :n]
    return y.reshape(*batch_shape, n)
