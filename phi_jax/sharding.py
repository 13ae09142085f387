"""Logical axis names -> mesh axes: the one rules table, and the helpers that apply it.

Model code names every parameter and block-boundary activation with logical axes (`embed`, `heads`, ...);
only this file knows the mesh axes (`data`, `fsdp`, `tensor`). An unmatched logical name is an error.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Megatron-style tensor parallelism splits heads and the MLP; FSDP shards the other large dim of each matrix.
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp"),  # activations: the batch is split over every data-parallel axis
    "length": None,
    "layers": None,  # the scanned layer axis
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "head_dim": None,
    "qkv": None,
    "mlp": "tensor",
    "act_embed": None,  # the embed dim of activations stays whole (FSDP gathers weights, not activations)
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

_CONTEXT: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("phi_jax_sharding", default=None)


def logical_to_spec(names: Sequence[str | None], rules: dict | None = None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a name missing from the rules is an error."""
    rules = LOGICAL_RULES if rules is None else rules
    spec, used = [], set()
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"Logical axis {name!r} has no sharding rule; add it to phi_jax.sharding.LOGICAL_RULES.")
        axes = rules[name]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard only one dim of a tensor
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict | None = None):
    """Within this context, `constrain` pins activations to the mesh through the rules."""
    token = _CONTEXT.set((mesh, LOGICAL_RULES if rules is None else rules))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `activation_sharding` (single device)."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
