"""Partial rotary position embedding, NeoX half-split convention (as Hugging Face's Phi).

Only the first `rotary_dim` dims of each head rotate; the rest pass through. Frequencies and the rotation
are computed in float32 whatever the compute dtype.
"""

import jax
import jax.numpy as jnp


def rotary_tables(positions: jax.Array, rotary_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables, each [batch, seq, rotary_dim], float32, for integer positions [batch, seq]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rotary_dim / 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # NeoX: the two halves share frequencies
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_partial_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; cos/sin: [batch, seq, rotary_dim]. Rotates x[..., :rotary_dim]."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot = x_rot.astype(jnp.float32)
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return jnp.concatenate([x_rot.astype(x.dtype), x_pass], axis=-1)
