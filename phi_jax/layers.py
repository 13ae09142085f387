"""The building blocks: parameters with logical axis names, LayerNorm, and Dense with an `impl` switch."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from phi_jax.activations import gelu_new
from phi_jax.config import DENSE_IMPLS
from phi_jax.dispatch import pallas_target

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str | None],
          dtype) -> nnx.Param:
    """A parameter annotated with logical axis names; the mesh placement is decided by phi_jax.sharding."""
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} logical names {tuple(names)} for a parameter of shape {tuple(shape)}.")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False)


class LayerNorm(nnx.Module):
    """LayerNorm with bias; statistics in float32, output in the compute dtype."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class Dense(nnx.Module):
    """x[..., *in_shape] @ kernel[*in_shape, *out_shape] + bias[*out_shape], then an optional activation.

    Multi-dim kernels keep heads visible to sharding (q/k/v: [embed, 3, heads, head_dim]). With
    `impl='pallas'` the matmul, bias and gelu_new run as one fused Pallas kernel on the flattened 2-D view, lowered
    for `platform` (phi_jax.dispatch.pallas_target; None: JAX's default backend).

    `lora` (phi_jax.lora.LoraConfig, this Dense one of its targets) adds a low-rank update through Flax NNX's own
    `nnx.LoRA` on the flattened 2-D view, before the activation: y = x W + b + (alpha / rank) * dropout(x) A B,
    with A [fan_in, rank] and B [rank, fan_out] (B starts at zero, so a fresh adapter leaves the output unchanged).
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, in_names: Sequence[str | None],
                 out_names: Sequence[str | None], activation: str | None = None, impl: str = "xla",
                 platform: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
                 lora=None, lora_target: str = "", lora_param_dtype=jnp.float32, rngs: nnx.Rngs):
        if activation not in (None, "gelu_new"):
            raise ValueError(f"activation={activation!r} is not one of (None, 'gelu_new').")
        if impl not in DENSE_IMPLS:
            raise ValueError(f"Dense impl={impl!r} is not one of {DENSE_IMPLS} (Compute.resolve resolves 'auto').")
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.activation, self.impl, self.platform, self.dtype = activation, impl, platform, dtype
        self.kernel = param(rngs, nnx.initializers.normal(init_std), self.in_shape + self.out_shape,
                            tuple(in_names) + tuple(out_names), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, self.out_shape, tuple(out_names), param_dtype)
        self.lora_scale, self.lora_dropout, self.lora_target = 0.0, 0.0, lora_target
        if lora is None:
            self.lora = None
        else:
            from phi_jax.lora import lora_names

            a_names, b_names = lora_names(in_names, out_names)
            self.lora = nnx.LoRA(math.prod(self.in_shape), lora.rank, math.prod(self.out_shape), dtype=dtype,
                                 param_dtype=lora_param_dtype, rngs=rngs,
                                 a_metadata={"out_sharding": a_names, "eager_sharding": False},
                                 b_metadata={"out_sharding": b_names, "eager_sharding": False})
            self.lora_scale, self.lora_dropout = lora.scale, lora.dropout

    def __call__(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
        n_in, out_dtype = len(self.in_shape), out_dtype or self.dtype
        kernel, bias = self.kernel[...].astype(self.dtype), self.bias[...]
        x = x.astype(self.dtype)
        if self.impl == "pallas":
            from phi_jax.dispatch import default_platform
            from phi_jax.kernels.dense import fused_dense

            platform = self.platform or default_platform()
            backend, interpret = pallas_target(platform)
            batch_shape = x.shape[: x.ndim - n_in]
            activation = None if self.lora is not None else self.activation  # the update goes in before it
            y = fused_dense(x.reshape(*batch_shape, -1), kernel.reshape(math.prod(self.in_shape), -1),
                            bias.reshape(-1).astype(self.dtype), activation=activation, backend=backend,
                            interpret=interpret, platform=platform)
            if self.lora is None:
                return y.reshape(*batch_shape, *self.out_shape).astype(out_dtype)
            y = y.reshape(*batch_shape, *self.out_shape).astype(jnp.float32)
        else:
            contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
            y = jax.lax.dot_general(x, kernel, (contract, ((), ())), preferred_element_type=jnp.float32)
            y = y + bias.astype(jnp.float32)
        if self.lora is not None:
            y = y + self._lora_update(x)
        if self.activation == "gelu_new":
            y = gelu_new(y)
        return y.astype(out_dtype)

    def _lora_update(self, x: jax.Array) -> jax.Array:
        """(alpha / rank) * dropout(x) A B in float32, shaped like the base output [..., *out_shape]."""
        from phi_jax.lora import apply_dropout

        batch_shape = x.shape[: x.ndim - len(self.in_shape)]
        flat = apply_dropout(x.reshape(*batch_shape, -1), self.lora_dropout, self.lora_target)
        update = self.lora(flat).astype(jnp.float32) * self.lora_scale
        return update.reshape(*batch_shape, *self.out_shape)
