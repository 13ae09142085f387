"""Hugging Face phi checkpoints, both ways, without torch (`phi_jax.from_pretrained` loads any model source)."""

from phi_jax.hf.io import load_hf_directory, save_pretrained

__all__ = ["load_hf_directory", "save_pretrained"]
