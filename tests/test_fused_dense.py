"""fused_dense vs dense_reference: forward and jax.grad, both lowerings, in Pallas interpret mode on CPU.

The `accelerator` class repeats the checks compiled (interpret=False) where a GPU or TPU exists.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from phi_jax import layers
from phi_jax.activations import gelu_new, gelu_new_grad
from phi_jax.kernels import dense_gpu, dense_tpu
from phi_jax.kernels.dense import BlockSizes, dense_reference, fused_dense

# Small blocks so that a few-hundred-element problem still spans several tiles in every dimension.
GPU_BLOCKS = BlockSizes(block_m=64, block_n=64, block_k=64)
TPU_BLOCKS = BlockSizes(block_m=32, block_n=128, block_k=128)
BLOCKS = {"gpu": GPU_BLOCKS, "tpu": TPU_BLOCKS}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative to the largest reference magnitude
ON_ACCELERATOR = jax.default_backend() in ("gpu", "tpu")


def _inputs(shape_x, n, dtype, seed=0):
    kx, kw, kb, kc = jax.random.split(jax.random.key(seed), 4)
    k = shape_x[-1]
    x = jax.random.normal(kx, shape_x, jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    b = jax.random.normal(kb, (n,), jnp.float32).astype(dtype)
    ct = jax.random.normal(kc, (*shape_x[:-1], n), jnp.float32)
    return x, w, b, ct


def _assert_close(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values (an unwritten tile?)"
    scale = float(np.max(np.abs(expected))) or 1.0
    err = float(np.max(np.abs(actual - expected)))
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:g} * {scale:.3g}"


def _value_and_grads(f, x, w, b, ct):
    """y = f(x, w, b) and (dx, dw, db) of sum(y * ct), as one jitted program (one compile per case)."""

    @jax.jit
    def run(x, w, b):
        y, vjp = jax.vjp(f, x, w, b)
        return y, vjp(ct.astype(y.dtype))

    return run(x, w, b)


def _check(x, w, b, ct, activation, tol, **kw):
    y, grads = _value_and_grads(functools.partial(fused_dense, activation=activation, **kw), x, w, b, ct)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[1])
    # The reference runs in fp32 on the same (possibly bf16-rounded) inputs.
    f32 = [a.astype(jnp.float32) for a in (x, w, b)]
    y_ref, ref = _value_and_grads(functools.partial(dense_reference, activation=activation), *f32, ct)
    _assert_close(y, y_ref, tol, "y")
    for name, g, r, primal in zip(("dx", "dw", "db"), grads, ref, (x, w, b), strict=True):
        assert g.dtype == primal.dtype, (name, g.dtype, primal.dtype)
        _assert_close(g, r, tol, name)


# (backend, x shape, N). The TPU interpreter is ~3x slower per grid step, so its ragged case is small but
# still spans 2 blocks in M, K and N; the remaining TPU cases run with -m slow.
SLOW = pytest.mark.slow
FP32_CASES = [
    pytest.param("gpu", (128, 128), 256, id="gpu-aligned", marks=SLOW),  # kernel-level in the poison test
    pytest.param("gpu", (100, 72), 200, id="gpu-ragged"),  # no dim a multiple of the 64-blocks
    pytest.param("gpu", (2, 50, 72), 200, id="gpu-3d"),
    pytest.param("tpu", (40, 200), 130, id="tpu-ragged"),
    pytest.param("tpu", (64, 256), 256, id="tpu-aligned", marks=SLOW),
    pytest.param("tpu", (2, 50, 72), 200, id="tpu-3d", marks=SLOW),
]


@pytest.mark.parametrize("activation", [None, "gelu_new"])
@pytest.mark.parametrize("backend,shape_x,n", FP32_CASES)
def test_fp32_forward_and_grads(backend, activation, shape_x, n):
    x, w, b, ct = _inputs(shape_x, n, jnp.float32)
    _check(x, w, b, ct, activation, TOL[jnp.float32], block_sizes=BLOCKS[backend], backend=backend)


@pytest.mark.parametrize("activation", [None, "gelu_new"])
@pytest.mark.parametrize("backend", ["gpu", pytest.param("tpu", marks=SLOW)])
def test_bf16_forward_and_grads(backend, activation):
    x, w, b, ct = _inputs((100, 72), 200, jnp.bfloat16, seed=1)
    _check(x, w, b, ct, activation, TOL[jnp.bfloat16], block_sizes=BLOCKS[backend], backend=backend)


def test_default_blocks_and_backend():
    """backend=None, block_sizes=None: the default tiles are shrunk to fit a small layer."""
    x, w, b, ct = _inputs((3, 5, 40), 48, jnp.float32, seed=2)
    _check(x, w, b, ct, "gelu_new", TOL[jnp.float32])


def test_layer_call_signature_bf16_bias():
    """How phi_jax.layers.Dense calls it: compute-dtype x and kernel, 1-D bias, inside jit."""
    x, w, b, _ = _inputs((2, 8, 64), 96, jnp.bfloat16, seed=3)
    y = jax.jit(lambda x, w, b: fused_dense(x.reshape(2, 8, -1), w, b, activation="gelu_new"))(x, w, b)
    _assert_close(y, dense_reference(x, w, b, "gelu_new"), TOL[jnp.bfloat16], "y")


def test_gelu_new_matches_definition():
    # One definition: Dense's XLA path uses it, and the kernels through phi_jax.activations.apply_activation.
    assert layers.gelu_new is gelu_new
    z = jnp.linspace(-6.0, 6.0, 101)
    expected = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    np.testing.assert_allclose(gelu_new(z), expected, rtol=1e-6, atol=1e-5)
    # The backward prologue's closed-form derivative against autodiff of the forward formula.
    np.testing.assert_allclose(gelu_new_grad(z), jax.vmap(jax.grad(gelu_new))(z), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ poison
# In interpret mode Pallas allocates kernel outputs filled with NaN (floats), so a tile a kernel forgets to
# store stays NaN. These tests call the lowerings directly on block-aligned shapes, so the full raw outputs
# (including rows/cols that fused_dense would slice away) are checked.
def test_interpret_outputs_start_as_nan():
    """The poison checks below have teeth: a kernel that stores only its first tile leaves NaN behind."""

    def kernel(o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = jnp.zeros_like(o_ref)

    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((32, 16), jnp.float32), grid=(2,),
                         out_specs=pl.BlockSpec((16, 16), lambda i: (i, 0)), interpret=True)()
    assert not np.isnan(out[:16]).any() and np.isnan(out[16:]).all()


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("activation", [None, "gelu_new"])
def test_every_output_element_written(backend, activation):
    lowering, blocks = {"gpu": (dense_gpu, GPU_BLOCKS), "tpu": (dense_tpu, TPU_BLOCKS)}[backend]
    m, k, n = 2 * blocks.block_m, 2 * blocks.block_k, 2 * blocks.block_n
    x, w, b, _ = _inputs((m, k), n, jnp.float32, seed=4)
    dy = jax.random.normal(jax.random.key(5), (m, n), jnp.float32)
    kw = dict(block_m=blocks.block_m, block_n=blocks.block_n, block_k=blocks.block_k, activation=activation,
              num_warps=4, num_stages=3, interpret=True)

    @jax.jit
    def run(x, w, b, dy):
        y, z = lowering.forward(x, w, b.reshape(1, n), save_preactivation=True, **kw)
        return y, z, lowering.backward_dx(dy, z, w, **kw), *lowering.backward_dw(x, dy, z, **kw)

    y, z, dx, dw, db = run(x, w, b, dy)
    z_ref = dense_reference(x, w, b)
    dz = dy * (jax.vmap(jax.vmap(jax.grad(gelu_new)))(z_ref) if activation else 1.0)
    hi = jax.lax.Precision.HIGHEST
    for name, got, want in [("y", y, dense_reference(x, w, b, activation)), ("z", z, z_ref),
                            ("dx", dx, jnp.dot(dz, w.T, precision=hi)), ("dw", dw, jnp.dot(x.T, dz, precision=hi)),
                            ("db", db, dz.sum(0, keepdims=True))]:
        _assert_close(got, want, TOL[jnp.float32], name)


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "x_shape,w_shape,b_shape,dtypes,kwargs,match",
    [
        ((4, 8), (9, 16), (16,), None, {}, r"x.shape\[-1\]=8 must equal w.shape\[0\]=9"),
        ((4, 8), (8, 16), (15,), None, {}, r"b.shape\[0\]=15 must equal w.shape\[1\]=16"),
        ((4, 8), (8, 16), (1, 16), None, {}, r"b \[N\]"),
        ((4, 8), (8, 16), (16,), (jnp.float32, jnp.bfloat16), {}, r"w.dtype=bfloat16 must equal x.dtype=float32"),
        ((4, 8), (8, 16), (16,), (jnp.int32, jnp.int32), {}, r"x.dtype=int32 is not supported"),
        ((4, 8), (8, 16), (16,), None, {"activation": "relu"}, r"activation='relu'"),
        ((4, 8), (8, 16), (16,), None, {"backend": "cuda"}, r"backend='cuda'"),
        ((4, 8), (8, 16), (16,), None, {"block_sizes": BlockSizes(48, 64, 64)}, r"block_m=48 must be a power of two"),
        ((4, 8), (8, 16), (16,), None, {"block_sizes": BlockSizes(64, 64, 128), "backend": "tpu"},
         r"block_n=64 must be a positive multiple of 128"),
        ((4, 8), (8, 16), (16,), (jnp.bfloat16, jnp.bfloat16), {"block_sizes": BlockSizes(8, 128, 128),
                                                                 "backend": "tpu"}, r"block_m=8 .* multiple of 16"),
    ],
)
def test_bad_inputs_raise(x_shape, w_shape, b_shape, dtypes, kwargs, match):
    xd, wd = dtypes or (jnp.float32, jnp.float32)
    x, w, b = jnp.ones(x_shape, xd), jnp.ones(w_shape, wd), jnp.ones(b_shape, jnp.float32)
    with pytest.raises(ValueError, match=match):
        fused_dense(x, w, b, **kwargs)


@pytest.mark.skipif(ON_ACCELERATOR, reason="checks the CPU error path")
def test_compiled_on_cpu_raises():
    x, w, b, _ = _inputs((16, 16), 16, jnp.float32)
    with pytest.raises(ValueError, match="interpret=False needs a GPU"):
        fused_dense(x, w, b, interpret=False)


# ------------------------------------------------------------------------------------------ accelerator
@pytest.mark.accelerator
@pytest.mark.skipif(not ON_ACCELERATOR, reason=f"compiled Pallas needs a GPU/TPU; backend is {jax.default_backend()}")
class TestCompiled:
    """The same checks compiled for the local accelerator with its default block sizes."""

    @pytest.mark.parametrize("activation", [None, "gelu_new"])
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("shape_x,n", [((512, 1024), 768), ((3, 100, 200), 300)], ids=["aligned", "ragged"])
    def test_forward_and_grads(self, activation, dtype, shape_x, n):
        x, w, b, ct = _inputs(shape_x, n, dtype)
        # fp32 matmuls on GPU tensor cores / the TPU MXU may run at reduced (tf32/bf16-pass) precision.
        _check(x, w, b, ct, activation, 2e-2 if dtype == jnp.bfloat16 else 2e-3, interpret=False)
