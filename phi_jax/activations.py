"""phi's activation, gelu_new, and its derivative: the one definition, used by Dense's XLA path, the fused dense
kernels (forward epilogue, backward prologue) and their reference.

The kernels call these on fp32 (they upcast): the tanh approximation loses ~3 digits if evaluated in bf16.
"""

import math

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_COEF = 0.044715


def _tanh(z: jax.Array) -> jax.Array:
    # z^3 first, then the coefficient: Hugging Face's order of operations (0.044715 * pow(z, 3)), to the bit.
    return jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_COEF * (z * z * z)))


def gelu_new(z: jax.Array) -> jax.Array:
    """GPT-2 / phi "gelu_new": 0.5*z*(1 + tanh(sqrt(2/pi)*(z + 0.044715*z^3))) (Hendrycks & Gimpel 2016, eq. 2)."""
    return 0.5 * z * (1.0 + _tanh(z))


def gelu_new_grad(z: jax.Array) -> jax.Array:
    """d gelu_new / dz = 0.5*(1+t) + 0.5*z*(1-t^2)*sqrt(2/pi)*(1 + 3*0.044715*z^2), t = tanh(...)."""
    t = _tanh(z)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_COEF * z * z)


def apply_activation(z: jax.Array, activation: str | None) -> jax.Array:
    """The forward epilogue: identity or gelu_new on the fp32 pre-activation."""
    return gelu_new(z) if activation == "gelu_new" else z


def activation_grad(dy: jax.Array, z: jax.Array | None, activation: str | None) -> jax.Array:
    """The backward prologue: dz = dy * act'(z), all fp32."""
    return dy * gelu_new_grad(z) if activation == "gelu_new" else dy
