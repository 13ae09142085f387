"""LoRA adapters on phi's Dense layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A target Dense (`qkv`, the attention output `dense`, `fc1`, `fc2`) gains Flax NNX's own `nnx.LoRA` on its flattened
2-D view: y = x W + b + (alpha / rank) * dropout(x) A B, with A [fan_in, rank] (He-uniform) and B [rank, fan_out]
(zeros), both `nnx.LoRAParam`. A fresh adapter therefore leaves the model's output exactly unchanged. Training holds
only the LoRAParams as trainable parameters and in the optimizer state; the base parameters are frozen (and may be
kept in bf16: `base_dtype`). The stacked (scanned) layout stacks the adapters like any other per-layer parameter.

Flattened dims: q/k/v's kernel is [embed, 3, heads, head_dim], so its B is [rank, 3 * heads * head_dim] in that
order (q, then k, then v: PEFT's three q_proj/k_proj/v_proj adapters share A and split B; phi_jax/hf/peft.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.config import as_dtype

TARGETS = ("qkv", "dense", "fc1", "fc2")  # the Dense layers an adapter may go on
# Where each target lives in a layer (stacked-layout parameter paths), and PEFT's names for it.
TARGET_PATHS = {"qkv": "layers.attn.qkv", "dense": "layers.attn.dense", "fc1": "layers.mlp.fc1",
                "fc2": "layers.mlp.fc2"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r), dropout on the adapter's input (training only), the target
    Dense layers, and the dtype the frozen base parameters are held in (None: the run's param_dtype)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    base_dtype: Any = None

    def __post_init__(self):
        targets = tuple(self.targets.split(",")) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets if t.strip()))
        if self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank} must be >= 1.")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha={self.alpha} must be > 0.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1).")
        if not self.targets or (unknown := sorted(set(self.targets) - set(TARGETS))):
            raise ValueError(f"LoRA targets={','.join(self.targets)!r}: each must be one of {list(TARGETS)} "
                             f"({'unknown: ' + ', '.join(unknown) if self.targets else 'none given'}).")
        if self.base_dtype is not None:
            object.__setattr__(self, "base_dtype", as_dtype(self.base_dtype, "LoRA base_dtype"))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "base_dtype": None if self.base_dtype is None else self.base_dtype.name}

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        return cls(**d)


def from_run_config(c) -> LoraConfig | None:
    """The LoRA of a run config (`--config.lora.rank=16 ...`), or None when lora.rank is 0 (full training)."""
    lc = c.lora
    if lc.rank == 0:
        return None
    return LoraConfig(rank=lc.rank, alpha=float(lc.alpha), dropout=float(lc.dropout), targets=lc.targets,
                      base_dtype=lc.base_dtype or None)


class Adapters(NamedTuple):
    """What a model's Dense layers need to build their adapters: the config and the adapters' param dtype."""

    config: LoraConfig
    param_dtype: Any


def lora_names(in_names: Sequence[str | None], out_names: Sequence[str | None]) -> tuple[tuple, tuple]:
    """Logical axis names of A [fan_in, rank] and B [rank, fan_out] (phi_jax.sharding.LOGICAL_RULES): a flattened
    dim that is one named dim keeps its name (so it is sharded like the base kernel's); a flattened dim of several
    (heads x head_dim) is `lora_fan`; the rank is `lora_rank`."""
    flat = lambda names: names[0] if len(names) == 1 else "lora_fan"
    return (flat(tuple(in_names)), "lora_rank"), ("lora_rank", flat(tuple(out_names)))


# ------------------------------------------------------------------------------------- dropout (training only)
# The train step sets one key per micro-batch; the model's layer loop splits it into one key per layer, and each
# target folds in its own index. Outside the train step (evaluation, generation, export) there is no dropout.
_STEP_KEY: contextvars.ContextVar = contextvars.ContextVar("phi_jax_lora_step_key", default=None)
_LAYER_KEY: contextvars.ContextVar = contextvars.ContextVar("phi_jax_lora_layer_key", default=None)


@contextlib.contextmanager
def training_dropout(key: jax.Array | None):
    """Within this context a model's LoRA dropout is active, drawn from `key` (one micro-batch's key)."""
    token = _STEP_KEY.set(key)
    try:
        yield
    finally:
        _STEP_KEY.reset(token)


def layer_dropout_keys(num_layers: int) -> jax.Array | None:
    """One dropout key per layer inside `training_dropout`, else None."""
    key = _STEP_KEY.get()
    return None if key is None else jax.random.split(key, num_layers)


@contextlib.contextmanager
def dropout_scope(key: jax.Array | None):
    """One layer's dropout key (None: no dropout), read by `apply_dropout`."""
    token = _LAYER_KEY.set(key)
    try:
        yield
    finally:
        _LAYER_KEY.reset(token)


def apply_dropout(x: jax.Array, rate: float, target: str) -> jax.Array:
    """Inverted dropout of an adapter's input at `rate` when a layer key is set; `x` unchanged otherwise."""
    key = _LAYER_KEY.get()
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, TARGETS.index(target)), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# ------------------------------------------------------------------------------------------- parameters
def is_adapter_path(path: str) -> bool:
    """Whether a dotted parameter path ("layers.attn.qkv.lora.lora_a") is an adapter's."""
    return ".lora." in path


def adapter_update(a: jax.Array | np.ndarray, b: jax.Array | np.ndarray, scale: float, kernel_shape):
    """(alpha / rank) * A B reshaped like the base kernel, in float32; A [..., fan_in, r], B [..., r, fan_out] with
    the same leading (layers) dims as the kernel."""
    xp = jnp if isinstance(a, jax.Array) else np
    update = xp.matmul(xp.asarray(a, xp.float32), xp.asarray(b, xp.float32)) * xp.float32(scale)
    return update.reshape(kernel_shape)


def merge_params(params: dict, lora: LoraConfig) -> dict:
    """Stacked-layout parameters with adapters -> plain parameters (float32) with every update merged into its
    kernel: W + (alpha / r) A B. `params` is not changed."""
    out = {p: v for p, v in params.items() if not is_adapter_path(p)}
    for target in lora.targets:
        prefix = TARGET_PATHS[target]
        kernel = np.asarray(out[f"{prefix}.kernel"], np.float32)
        a, b = (np.asarray(params[f"{prefix}.lora.lora_{x}"], np.float32) for x in "ab")
        out[f"{prefix}.kernel"] = kernel + adapter_update(a, b, lora.scale, kernel.shape)
    return out


def merge_lora(model):
    """A plain model (no adapters) whose kernels hold `model`'s adapters merged in, in model.compute.param_dtype,
    the layer layout of `model`. Merging is done in float32."""
    from phi_jax.model import from_params, stacked_params

    if model.lora is None:
        raise ValueError("The model has no LoRA adapters to merge.")
    params = {p: np.asarray(jax.device_get(v)) for p, v in stacked_params(model).items()}
    return from_params(model.cfg, model.compute, merge_params(params, model.lora), scan_layers=model.scan_layers)


@jax.jit
def _checksums(params) -> list[jax.Array]:
    def one(x):
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        bits = bits.reshape(-1).astype(jnp.uint32)
        weight = (jnp.arange(bits.size, dtype=jnp.uint32) % jnp.uint32(65521)) + jnp.uint32(1)
        return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])

    return [one(x) for x in jax.tree.leaves(params)]


def fingerprint(params) -> str:
    """A short digest of a parameter tree's exact bits (two wrapping uint32 sums per tensor, computed where the
    arrays are, sharded or not): a resumed or exported LoRA run checks that its base model is the one it trained
    on."""
    sums = np.asarray(jax.device_get(_checksums(params)), np.uint32)
    shapes = ";".join(f"{tuple(x.shape)}{x.dtype}" for x in jax.tree.leaves(params))
    return hashlib.sha256(sums.tobytes() + shapes.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- a LoRA run's checkpoints
def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_lora(meta: dict) -> LoraConfig | None:
    """The LoRA settings a checkpoint's metadata records (None: full training)."""
    saved = meta.get("lora")
    return None if saved is None else LoraConfig.from_dict({k: saved[k] for k in
                                                           ("rank", "alpha", "dropout", "targets", "base_dtype")})


def load_base(meta: dict, where: str) -> dict:
    """The frozen base of a LoRA run as it trained on it: its stacked-layout parameters (base_dtype), loaded from
    the base model its checkpoint names (or re-initialised from the run seed when it named none), after checking
    their fingerprint."""
    from flax import nnx

    from phi_jax.config import Compute, PhiConfig
    from phi_jax.loading import from_pretrained
    from phi_jax.model import Phi
    from phi_jax.train_state import split_params

    cfg, lora, saved = PhiConfig.from_dict(meta["model"]), run_lora(meta), meta["lora"]
    run = meta["run"]
    dtype = lora.base_dtype or as_dtype(run["param_dtype"])
    if saved["base"]:
        model = from_pretrained(saved["base"], Compute(param_dtype=dtype))
        base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    else:  # the trainer's fresh initialisation, jitted as there (eager draws differ in the last bit)
        base = jax.jit(lambda: split_params(Phi(cfg, Compute(param_dtype=run["param_dtype"]),
                                                rngs=nnx.Rngs(params=run["seed"]), lora=lora))[2])()
    if (found := fingerprint(base)) != saved["base_fingerprint"]:
        raise ValueError(f"The base model {saved['base'] or '(fresh, seed)'} is not the one the adapters in {where} "
                         f"were trained on (fingerprint {found}, checkpoint {saved['base_fingerprint']}): its weights "
                         "changed. Restore the original weights at that path.")
    return _flat(base)


def load_lora_workdir(workdir, step: int | None = None, compute=None):
    """(model with its adapters, meta, step) of a LoRA run's newest (or chosen) checkpoint: the adapters from the
    checkpoint, the base from where the checkpoint names it (`load_base`). Parameters in compute.param_dtype
    (default float32), adapters included."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from phi_jax.checkpoint import _checkpoint_steps, _choose
    from phi_jax.config import Compute, PhiConfig
    from phi_jax.model import abstract_model, from_params

    compute = compute or Compute()
    ckpt, steps = _checkpoint_steps(workdir)
    try:
        step = _choose(ckpt, steps, step)
        meta = ckpt.read_meta(step)
        cfg, lora = PhiConfig.from_dict(meta["model"]), run_lora(meta)
        if lora is None:
            raise ValueError(f"{workdir} is a full-training run, not LoRA: load it with phi_jax.from_pretrained.")
        abstract = abstract_model(cfg, Compute(param_dtype=meta["run"]["param_dtype"]), lora=lora)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = nnx.to_pure_dict(nnx.split(abstract, nnx.LoRAParam, ...)[1])
        target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)}
        restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True)
        adapters = ckpt.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]
    finally:
        ckpt.close()
    params = {**load_base(meta, str(workdir)), **_flat(adapters)}
    model = from_params(cfg, compute, params, lora=dataclasses.replace(lora, base_dtype=None))
    return model, meta, step
