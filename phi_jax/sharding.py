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
    # LoRA adapters (phi_jax/lora.py): A [fan_in, rank], B [rank, fan_out]. A flattened dim that is one named dim
    # (embed, mlp) keeps that name; the rank and a flattened heads x head_dim dim stay whole (they are small).
    "lora_rank": None,
    "lora_fan": None,
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


def active_mesh_and_rules() -> tuple[Mesh, dict] | None:
    """The (mesh, rules) of the enclosing `activation_sharding`, or None outside one (single device)."""
    return _CONTEXT.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `activation_sharding` (single device)."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


# How each strategy splits the `embed` dim of parameters and of optimizer moments (heads, mlp and vocab always go
# to `tensor`). Under jit, ZeRO-1 and ZeRO-2 coincide: gradients are a temporary that XLA reduce-scatters straight
# into the sharded moments.
STRATEGIES: dict[str, tuple[tuple[str, ...] | str | None, tuple[str, ...] | str | None]] = {
    "dp": (None, None),  # data parallel: parameters and moments replicated
    "zero1": (None, ("data", "fsdp")),  # ZeRO-1/2 (phi-1.5's DeepSpeed setting): moments sharded, params replicated
    "fsdp": ("fsdp", "fsdp"),  # fully sharded over `fsdp` (replicated over `data`: hybrid sharding)
}


def strategy_rules(strategy: str) -> tuple[dict, dict]:
    """(parameter rules, optimizer-moment rules) for a sharding strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"sharding={strategy!r} is not one of {sorted(STRATEGIES)}.")
    params_embed, moments_embed = STRATEGIES[strategy]
    return {**LOGICAL_RULES, "embed": params_embed}, {**LOGICAL_RULES, "embed": moments_embed}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *, dcn_data: int = 1) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 to take the devices the others leave.

    `dcn_data > 1` builds a hybrid mesh for multi-slice TPU or multi-node GPU: the `data` axis is split into
    `dcn_data` groups across slices/nodes (slow network), and every other axis stays inside one slice/node (fast
    interconnect). Nodes are told apart by TPU slice index, or by process when all devices share one slice
    (GPU clusters).
    """
    devices = jax.devices() if devices is None else devices
    sizes = [data, fsdp, tensor]
    named = lambda: dict(zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {named()} must be positive, with at most one -1.")
    if -1 in sizes:
        known = -sizes[0] * sizes[1] * sizes[2]
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh whose fixed axes total {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if (total := sizes[0] * sizes[1] * sizes[2]) != len(devices):
        raise ValueError(f"mesh {named()} needs {total} devices, found {len(devices)}; "
                         "set one axis to -1 to take the rest.")
    if dcn_data > 1:
        if sizes[0] % dcn_data:
            raise ValueError(f"mesh.data={sizes[0]} is not divisible by mesh.dcn_data={dcn_data} (slices or nodes).")
        from jax.experimental import mesh_utils

        by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1  # one slice: nodes are processes
        groups = len({d.process_index if by_process else d.slice_index for d in devices})
        if groups != dcn_data:
            raise ValueError(f"mesh.dcn_data={dcn_data} but the devices form {groups} "
                             f"{'processes' if by_process else 'slices'}; set it to {groups}.")
        grid = mesh_utils.create_hybrid_device_mesh((sizes[0] // dcn_data, sizes[1], sizes[2]), (dcn_data, 1, 1),
                                                    devices, process_is_granule=by_process)
        return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Sharding of a [..., batch, seq] batch: batch over every data-parallel axis (data x fsdp)."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_dims), ("data", "fsdp"), None))
