"""phi_jax: Microsoft's phi-1.5 in JAX/Flax NNX.

The names below are imported on first use, so that an entry point (`python -m phi_jax.train`) runs its own first
lines, such as its signal handling, before JAX and Flax are imported.
"""

import importlib
from typing import TYPE_CHECKING

_HOMES = {"Compute": "phi_jax.config", "PhiConfig": "phi_jax.config", "save_pretrained": "phi_jax.hf",
          "from_pretrained": "phi_jax.loading", "Cache": "phi_jax.model", "Phi": "phi_jax.model",
          "abstract_model": "phi_jax.model", "init_model": "phi_jax.model"}

__all__ = ["Cache", "Compute", "Phi", "PhiConfig", "abstract_model", "from_pretrained", "init_model",
           "save_pretrained"]

if TYPE_CHECKING:
    from phi_jax.config import Compute, PhiConfig
    from phi_jax.hf import save_pretrained
    from phi_jax.loading import from_pretrained
    from phi_jax.model import Cache, Phi, abstract_model, init_model


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'phi_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
