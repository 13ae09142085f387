"""The sharded training program for one mesh, built in one place: `build_trainer(cfg, compute, tx, mesh)`.

It computes the sharding rules, the abstract state and its shardings once, and jits the pure
`train_step(state, batch)` and `eval_step` with them (phi_jax/train_step.py). Training (`phi_jax.train`), starting
from pretrained weights (`--config.init_from_hf`), the memory planner and the benchmarks all build their step here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from phi_jax.config import Compute, PhiConfig
from phi_jax.dispatch import device_capability, mesh_platform
from phi_jax.lora import LoraConfig
from phi_jax.sharding import batch_sharding, strategy_rules
from phi_jax.train_state import CheckpointedState, TrainState, init_state, state_shardings
from phi_jax.train_step import BATCH_DTYPES, jit_steps

log = logging.getLogger("phi_jax")


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything the train and eval steps of one (architecture, compute, optimizer, mesh, strategy) need."""

    cfg: PhiConfig
    compute: Compute
    tx: optax.GradientTransformation
    mesh: Mesh
    rules: dict  # the strategy's parameter rules (activations follow them too)
    opt_rules: dict  # the strategy's optimizer-moment rules
    abstract_state: TrainState  # jax.ShapeDtypeStructs carrying the shardings: what restores and compiles take
    shardings: TrainState
    train_step: Callable  # jitted: explicit in/out shardings, the state donated
    eval_step: Callable
    lora: LoraConfig | None = None  # LoRA: adapters trained, the base frozen (phi_jax/lora.py)

    @property
    def batch_sharding(self) -> NamedSharding:
        """A train batch [accum, micro_batch, seq]: the micro-batch split over the data-parallel axes."""
        return batch_sharding(self.mesh, leading_dims=1)

    @property
    def eval_batch_sharding(self) -> NamedSharding:
        """An eval batch [batch, seq]."""
        return batch_sharding(self.mesh)

    def abstract_batch(self, accum: int, micro_batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A global train batch [accum, micro_batch, seq_len] (micro_batch: rows over all devices), abstract."""
        return {k: jax.ShapeDtypeStruct((accum, micro_batch, seq_len), dtype, sharding=self.batch_sharding)
                for k, dtype in BATCH_DTYPES.items()}

    def init_state(self, seed: int = 0, *, init_from: str | os.PathLike | None = None,
                   adapters_from: str | os.PathLike | None = None) -> TrainState:
        """A fresh train state, created directly in its shardings (nothing is materialised whole on one host).

        `init_from` starts from pretrained parameters instead: a Hugging Face directory (local or gs://), a Hub id
        or a training workdir, whose architecture must equal `cfg` (checked before any weight is read); they are
        cast to compute.param_dtype (a LoRA run's base: lora.base_dtype), and the optimizer state is fresh. With
        LoRA they are the frozen base, and `adapters_from` (a PEFT adapter directory) starts the adapters."""
        state = jax.jit(lambda: init_state(self.cfg, self.compute, self.tx, seed, self.lora),
                        out_shardings=self.shardings)()
        if init_from:
            pretrained = self.pretrained_params(init_from)
            state = state.replace(params=pretrained) if self.lora is None else state.replace(frozen=pretrained)
        if adapters_from:
            if self.lora is None:
                raise ValueError(f"Adapters from {adapters_from} need a LoRA run: set --config.lora.rank.")
            from phi_jax.hf.peft import load_peft_adapters

            adapters = load_peft_adapters(adapters_from, self.cfg, self.lora)
            state = state.replace(params=jax.device_put(
                jax.tree.map(lambda a, t: np.asarray(a, t.dtype), adapters, self.abstract_state.params),
                self.shardings.params))
        return state

    def pretrained_params(self, source: str | os.PathLike) -> dict:
        """The parameters of a model source (see `init_state`) in this trainer's shardings and param dtype (a LoRA
        run's: its frozen base's)."""
        from phi_jax.loading import from_pretrained, load_config, resolve

        source = resolve(source)
        if (saved := load_config(source)) != self.cfg:  # before reading any weight
            raise ValueError(f"{source.name} does not have the architecture of the run's model (checkpoint vs run: "
                             + "; ".join(saved.diff(self.cfg)) + "); choose the preset (--config.model) it was "
                             "trained as.")
        model = from_pretrained(source, Compute(param_dtype=self.base_param_dtype))
        target = self.shardings.params if self.lora is None else self.shardings.frozen
        params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), target)
        log.info("initialised %s from %s", "parameters" if self.lora is None else "the frozen base", source.name)
        return params

    @property
    def base_param_dtype(self):
        """The dtype of the (frozen, with LoRA) base parameters."""
        if self.lora is not None and self.lora.base_dtype is not None:
            return self.lora.base_dtype
        return self.compute.param_dtype

    @property
    def checkpoint_target(self) -> CheckpointedState:
        """What a checkpoint holds, abstract: the state less a LoRA run's frozen base (named in the metadata).
        `CheckpointedState.with_frozen` makes a restored one a TrainState again."""
        return CheckpointedState.of(self.abstract_state)

    @staticmethod
    def checkpointed(state: TrainState) -> CheckpointedState:
        """The part of `state` a checkpoint holds (see `checkpoint_target`)."""
        return CheckpointedState.of(state)


def build_trainer(cfg: PhiConfig, compute: Compute, tx: optax.GradientTransformation, mesh: Mesh,
                  sharding: str = "fsdp", lora: LoraConfig | None = None) -> Trainer:
    """The sharded train and eval steps of `cfg` on `mesh` under a sharding strategy (phi_jax.sharding.STRATEGIES).

    `compute` is resolved for the mesh's platform (`auto` becomes what runs on its devices: a mesh of TPU topology
    devices compiles the TPU kernels from any host). Nothing is allocated: the state is abstract until
    `Trainer.init_state` (or a checkpoint restore into `Trainer.checkpoint_target`). `lora` trains LoRA adapters
    on a frozen base (phi_jax/lora.py)."""
    compute = compute.resolve(mesh_platform(mesh), device_capability(mesh.devices.flat[0]))
    rules, opt_rules = strategy_rules(sharding)
    abstract, shardings = state_shardings(cfg, tx, mesh, rules, opt_rules, compute=compute, lora=lora)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    train_fn, eval_fn = jit_steps(mesh, shardings, rules)
    return Trainer(cfg=cfg, compute=compute, tx=tx, mesh=mesh, rules=rules, opt_rules=opt_rules,
                   abstract_state=target, shardings=shardings, train_step=train_fn, eval_step=eval_fn, lora=lora)


def lora_meta(lora: LoraConfig, c, frozen) -> dict:
    """What a LoRA run's checkpoints record beside the adapters: the LoRA settings, the base model they adapt
    (`init_from_hf`; "" = the run seed's fresh initialisation) and the fingerprint of its parameters' bits."""
    from phi_jax.lora import fingerprint

    return {**lora.to_dict(), "base": base_name(c.init_from_hf), "base_fingerprint": fingerprint(frozen)}


def base_name(source: str) -> str:
    """How a checkpoint names its base model: a local path made absolute (exports and resumes may run from another
    directory); a Hub id, a gs:// path or "" (a fresh, seeded base) as given."""
    from phi_jax.paths import is_url

    if source and not is_url(source) and os.path.exists(source):
        return os.path.abspath(source)
    return source


def lora_resume_base(trainer: Trainer, restored: CheckpointedState, c, saved_meta: dict, where: str) -> TrainState:
    """`restored` (a LoRA checkpoint: adapters and optimizer state) with its frozen base loaded again from the
    base model the checkpoint names, after checking that the LoRA settings and the base's bits are unchanged."""
    from phi_jax.lora import fingerprint

    saved = saved_meta.get("lora")
    if saved is None:
        raise ValueError(f"The checkpoint at {where} is of full training, not LoRA; resume it without "
                         "--config.lora.rank, or start a new --workdir.")
    ours = trainer.lora.to_dict()
    if changed := [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in ours.items() if k != "dropout" and saved.get(k) != v]:
        raise ValueError(f"The checkpoint at {where} holds LoRA adapters of other settings ({'; '.join(changed)}); "
                         "use the settings that wrote it, or a new --workdir.")
    if saved["base"] != base_name(c.init_from_hf):
        raise ValueError(f"The checkpoint at {where} adapts the base model {saved['base'] or '(fresh, seed)'!r} but "
                         f"--config.init_from_hf={c.init_from_hf!r}; set it to the base the adapters were trained on.")
    base = trainer.init_state(c.seed, init_from=c.init_from_hf or None).frozen
    if (found := fingerprint(base)) != saved["base_fingerprint"]:
        raise ValueError(f"The base model {saved['base'] or '(fresh, seed)'} is not the one the adapters at {where} "
                         f"were trained on (fingerprint {found}, checkpoint {saved['base_fingerprint']}): its weights "
                         "changed. Point --config.init_from_hf at the original weights, or start a new --workdir "
                         "(--config.lora.init_from_peft can carry exported adapters over).")
    return restored.with_frozen(base)
