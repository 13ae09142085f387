"""Hugging Face phi checkpoints, both ways, without torch."""

from phi_jax.hf.io import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
