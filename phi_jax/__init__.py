"""phi_jax: Microsoft's phi-1.5 in JAX/Flax NNX.

The public names load on first use, so that `python -m phi_jax.train` (and `.generate`, `.evaluate`) can restart
itself with glibc's malloc on transparent huge pages (phi_jax/host_memory.py) before anything imports JAX.
"""

import importlib
import sys
from typing import TYPE_CHECKING

from phi_jax import host_memory

if host_memory.launched_as_entry_point(getattr(sys, "orig_argv", [])):
    host_memory.ensure_huge_pages()

_EXPORTS = {"PhiConfig": "phi_jax.config", "from_pretrained": "phi_jax.hf", "save_pretrained": "phi_jax.hf",
            "KVCache": "phi_jax.model", "Phi": "phi_jax.model", "abstract_model": "phi_jax.model",
            "init_model": "phi_jax.model"}
__all__ = ["KVCache", "Phi", "PhiConfig", "abstract_model", "from_pretrained", "init_model", "save_pretrained"]

if TYPE_CHECKING:
    from phi_jax.config import PhiConfig
    from phi_jax.hf import from_pretrained, save_pretrained
    from phi_jax.model import KVCache, Phi, abstract_model, init_model


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'phi_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
