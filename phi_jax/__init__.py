"""phi_jax: Microsoft's phi-1.5 in JAX/Flax NNX."""

from phi_jax.config import Compute, PhiConfig
from phi_jax.hf import save_pretrained
from phi_jax.loading import from_pretrained
from phi_jax.model import Cache, Phi, abstract_model, init_model

__all__ = ["Cache", "Compute", "Phi", "PhiConfig", "abstract_model", "from_pretrained", "init_model",
           "save_pretrained"]
