"""phi_jax: Microsoft's phi-1.5 in JAX/Flax NNX."""
