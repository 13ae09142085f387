"""What a phi model is and how it runs: two frozen dataclasses.

`PhiConfig` is the architecture, the fields a Hugging Face config.json maps to: two models with equal PhiConfigs
hold the same parameter shapes and compute the same function. `Compute` is how that function is run (dtypes,
attention and dense implementations, rematerialisation): it never changes what a checkpoint holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# Every list of choices is here once; validation, dispatch, the run configs' comments and the tools' flags read it.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PLATFORMS = ("cpu", "gpu", "tpu")
AUTO = "auto"  # the implementation phi_jax.dispatch picks for the platform (and dtype)
# Attention implementations (phi_jax.attention) and the platforms each runs on; on "cpu" the Pallas kernels
# (pallas, splash) run in interpret mode.
ATTENTION_IMPLS: dict[str, tuple[str, ...]] = {"xla": PLATFORMS, "pallas": PLATFORMS, "splash": ("cpu", "tpu"),
                                               "cudnn": ("gpu",)}
DENSE_IMPLS = ("xla", "pallas")  # phi_jax.layers.Dense: XLA's dot, or the fused Pallas kernel (every platform)
ATTENTION_CHOICES, DENSE_CHOICES = (AUTO, *ATTENTION_IMPLS), (AUTO, *DENSE_IMPLS)
# What the backward pass recomputes per layer: the jax.checkpoint policy of each choice ("none": no remat).
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def as_dtype(value: Any, what: str = "dtype") -> jnp.dtype:
    """`value` ("bfloat16", jnp.bfloat16, np.dtype(...)) as a jnp dtype, if it is one of DTYPES."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in DTYPES:
        raise ValueError(f"{what}={value!r} is not one of {sorted(DTYPES)}.")
    return dtype


@dataclasses.dataclass(frozen=True)
class Compute:
    """How a model runs: none of these changes its parameters' shapes or what a checkpoint holds.

    dtype: activations and matmuls (softmax, norms and logits stay float32); param_dtype: the stored parameters.
    Both are jnp dtypes; their names ("bfloat16") are accepted and converted. `platform` is where the model runs,
    set by `resolve`, which also replaces `auto` by the implementation that runs there: a model resolves its
    Compute once, when it is made (for JAX's default backend unless already resolved; phi_jax.trainer resolves
    it for the mesh's devices), so every choice is static in its graph.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = AUTO  # ATTENTION_CHOICES (phi_jax.attention)
    dense_impl: str = AUTO  # DENSE_CHOICES
    remat: str = "none"  # REMAT_POLICIES: what the backward pass recomputes per layer
    platform: str | None = None  # PLATFORMS, once resolved
    # What runs an attention call whose shapes the resolved implementation cannot train (set by `resolve` where
    # `auto` chose cudnn: xla; phi_jax.dispatch.attention_for_call). None: such a call is an error.
    attention_fallback: str | None = None

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, as_dtype(getattr(self, name), f"Compute.{name}"))
        for name, allowed in (("attention_impl", ATTENTION_CHOICES), ("dense_impl", DENSE_CHOICES),
                              ("remat", tuple(REMAT_POLICIES)), ("platform", (None, *PLATFORMS)),
                              ("attention_fallback", (None, *ATTENTION_IMPLS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Compute.{name}={getattr(self, name)!r} is not one of {allowed}.")

    def replace(self, **changes) -> Compute:
        return dataclasses.replace(self, **changes)

    def resolve(self, platform: str, capability: tuple[int, int] | None = None) -> Compute:
        """This Compute on `platform` ("cpu", "gpu" or "tpu"; `capability`: the GPU's compute capability, None for
        JAX's default GPU's): `auto` replaced by the implementation that runs there, and every choice checked to
        run there (a ValueError naming the fix otherwise). Logged once per choice."""
        from phi_jax import dispatch

        if self.platform not in (None, platform):
            raise ValueError(f"This Compute was resolved for {self.platform!r}, not {platform!r}; resolve the "
                             "unresolved Compute (platform=None) for each platform.")
        attention = dispatch.resolve_attention_impl(self.attention_impl, self.dtype, platform, capability)
        fallback = self.attention_fallback or ("xla" if self.attention_impl == AUTO and attention == "cudnn" else None)
        return self.replace(attention_impl=attention, attention_fallback=fallback, platform=platform,
                            dense_impl=dispatch.resolve_dense_impl(self.dense_impl, platform))

    def to_dict(self) -> dict:
        """Plain values (dtype names), as run configs and JSON hold them."""
        return {**dataclasses.asdict(self), "dtype": self.dtype.name, "param_dtype": self.param_dtype.name}


@dataclasses.dataclass(frozen=True)
class PhiConfig:
    """phi-1 / phi-1.5 architecture (parallel attention + MLP blocks sharing one LayerNorm).

    Defaults are phi-1.5 (microsoft/phi-1_5); `PhiConfig.preset(name)` gives the named variants.
    """

    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_layers: int = 24
    num_heads: int = 32
    rotary_dim: int = 32  # rotary on the first `rotary_dim` dims of each head (partial_rotary_factor * head_dim)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    # Recorded with the architecture but not part of it (== ignores them): the tokenizer's special ids, and the
    # std of a fresh initialisation. Two configs that differ only here hold interchangeable parameters.
    bos_token_id: int = dataclasses.field(default=50256, compare=False)
    eos_token_id: int = dataclasses.field(default=50256, compare=False)
    initializer_range: float = dataclasses.field(default=0.02, compare=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PhiConfig.{name}={getattr(self, name)} must be positive.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}: "
                "choose num_heads so that head_dim = hidden_size / num_heads is an integer.")
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(
                f"rotary_dim={self.rotary_dim} must be even, positive and at most head_dim={self.head_dim} "
                "(phi-1.5: 32 of 64).")
        if self.rope_theta <= 0 or self.layer_norm_eps <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} and layer_norm_eps={self.layer_norm_eps} must be positive.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> PhiConfig:
        return dataclasses.replace(self, **changes)

    def diff(self, other: PhiConfig) -> list[str]:
        """The fields that differ, worded for an error message ("num_layers: 24 vs 2"); equality is `==`."""
        return [f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if f.compare and getattr(self, f.name) != getattr(other, f.name)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PhiConfig:
        """A PhiConfig from `to_dict()`'s output; an unknown key is an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown PhiConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> PhiConfig:
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return dataclasses.replace(PRESETS[name], **overrides)

    def num_params(self) -> int:
        """Parameter count from the formula (checked against the real tree in tests)."""
        d, f, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        per_layer = 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
        return v * d + n * per_layer + 2 * d + (d * v + v)


PRESETS: dict[str, PhiConfig] = {
    # microsoft/phi-1_5 and microsoft/phi-1: 1,418,270,720 parameters.
    "phi-1.5": PhiConfig(),
    # ~100M parameters, phi-shaped (head_dim 64, partial rotary 32): benchmarks on one host.
    "phi-100m": PhiConfig(vocab_size=8192, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                          eos_token_id=2, bos_token_id=1),
    # The README quickstart: trains on the embedded stdlib corpus on a 2-core CPU in minutes.
    "quickstart": PhiConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                            max_position_embeddings=2048, eos_token_id=2, bos_token_id=1),
    # Unit tests: tiny, but still partial rotary (16 of head_dim 32).
    "tiny": PhiConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=2,
                      rotary_dim=16, max_position_embeddings=1024, eos_token_id=2, bos_token_id=1),
}
