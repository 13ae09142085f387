"""The run config checked before anything is built: every key's type and range, and how the batch divides.

Each rule names the key and the fix in one line (a ValueError), so `python -m phi_jax.train` reports it without a
traceback before reading data, allocating parameters or compiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_collections

from phi_jax.config import ATTENTION_CHOICES, DENSE_CHOICES, DTYPES, PRESETS, REMAT_POLICIES
from phi_jax.data.tokenizer import MIN_VOCAB_SIZE
from phi_jax.lora import TARGETS as LORA_TARGETS
from phi_jax.sharding import STRATEGIES


def _one_of(*choices) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"one of {list(choices)}"


def _at_least(low) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: math.isfinite(v) and v >= low), f">= {low}"


def _in_unit(v) -> bool:
    return 0.0 <= v < 1.0


def _mesh_axis(v) -> bool:
    return v == -1 or v >= 1


ANY: tuple[Callable[[Any], bool], str] = ((lambda v: True), "")
POSITIVE = _at_least(1)
NON_NEGATIVE = _at_least(0)

# key -> (type, (predicate, what it must be)). Every key of base_config() has a rule (tests/test_config_validation.py).
RULES: dict[str, tuple[type | tuple[type, ...], tuple[Callable[[Any], bool], str]]] = {
    "model": (str, _one_of(*sorted(PRESETS))),
    "dtype": (str, _one_of(*DTYPES)),
    "param_dtype": (str, _one_of(*DTYPES)),
    "attention_impl": (str, _one_of(*ATTENTION_CHOICES)),  # where each runs: Compute.resolve, at setup
    "dense_impl": (str, _one_of(*DENSE_CHOICES)),
    "remat": (str, _one_of(*REMAT_POLICIES)),
    "seed": (int, ((lambda v: 0 <= v < 2**32), "in [0, 2**32) (it seeds jax.random and the data order)")),
    "seq_len": (int, POSITIVE),
    "batch_size": (int, POSITIVE),
    "micro_batch_per_device": (int, NON_NEGATIVE),
    "total_steps": (int, POSITIVE),
    "learning_rate": (float, NON_NEGATIVE),
    "warmup_steps": (int, NON_NEGATIVE),
    "b1": (float, (_in_unit, "in [0, 1)")),
    "b2": (float, (_in_unit, "in [0, 1)")),
    "eps": (float, ((lambda v: math.isfinite(v) and v > 0), "> 0")),
    "weight_decay": (float, NON_NEGATIVE),
    "grad_clip_norm": (float, NON_NEGATIVE),
    "max_consecutive_skips": (int, POSITIVE),
    "log_every": (int, POSITIVE),
    "eval_every": (int, NON_NEGATIVE),
    "eval_batches": (int, NON_NEGATIVE),
    "checkpoint_every": (int, POSITIVE),
    "keep_checkpoints": (int, POSITIVE),
    "peak_flops_per_device": (float, NON_NEGATIVE),
    "allow_changes": (str, ANY),
    "data.path": (str, ANY),
    "data.tokenizer": (str, ANY),
    "data.packing": (bool, ANY),
    "data.default_vocab_size": (int, _at_least(MIN_VOCAB_SIZE)),
    "data.cache_dir": (str, ANY),
    "data.mixture_weights": (str, ANY),  # its weights are parsed and checked with the sources (data/training_data.py)
    "data.verify_checksums": (bool, ANY),
    "init_from_hf": (str, ANY),
    "lora.rank": (int, NON_NEGATIVE),
    "lora.alpha": (float, ((lambda v: math.isfinite(v) and v > 0), "> 0")),
    "lora.dropout": (float, (_in_unit, "in [0, 1)")),
    "lora.targets": (str, ((lambda v: bool(v.strip()) and {t.strip() for t in v.split(",") if t.strip()}
                            <= set(LORA_TARGETS)), f"a comma-separated subset of {list(LORA_TARGETS)}")),
    "lora.base_dtype": (str, _one_of("", *DTYPES)),
    "lora.init_from_peft": (str, ANY),
    "mesh.data": (int, (_mesh_axis, "-1 (the devices left) or >= 1")),
    "mesh.fsdp": (int, (_mesh_axis, "-1 (the devices left) or >= 1")),
    "mesh.tensor": (int, (_mesh_axis, "-1 (the devices left) or >= 1")),
    "mesh.dcn_data": (int, POSITIVE),
    "sharding": (str, _one_of(*STRATEGIES)),
}


def flatten(c: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    """{"data.path": ..., "mesh.fsdp": ...}: every leaf of a (nested) config by its dotted key."""
    out = {}
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict | dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_type(key: str, value: Any, kind) -> None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ValueError(f"--config.{key}={value!r} must be a {'/'.join(k.__name__ for k in kinds)}.")
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise ValueError(f"--config.{key}={value} is out of range: it must fit a 64-bit integer.")


def check_values(c: ml_collections.ConfigDict) -> None:
    """Every key with a rule has the right type and range; cross-key rules that need no devices."""
    for key, value in flatten(c).items():
        if key not in RULES:
            continue  # a key added without a rule is caught by the tests, not at run time
        kind, (ok, must) = RULES[key]
        _check_type(key, value, kind)
        if not ok(value):
            raise ValueError(f"--config.{key}={value!r} must be {must}.")
    max_len = PRESETS[c.model].max_position_embeddings
    if c.seq_len > max_len:
        raise ValueError(f"--config.seq_len={c.seq_len} exceeds model {c.model!r}'s max_position_embeddings="
                         f"{max_len}; lower --config.seq_len.")
    if c.lora.init_from_peft and c.lora.rank == 0:
        raise ValueError(f"--config.lora.init_from_peft={c.lora.init_from_peft!r} starts LoRA adapters: set "
                         "--config.lora.rank to the adapter's rank (its adapter_config.json's r).")
    if [c.mesh.data, c.mesh.fsdp, c.mesh.tensor].count(-1) > 1:
        raise ValueError("At most one of --config.mesh.data/fsdp/tensor may be -1 (the devices the others leave).")


def accumulation_steps(c: ml_collections.ConfigDict, data_parallel: int, processes: int) -> int:
    """Micro-batches per optimizer step; the global batch must divide by the processes, the data-parallel devices
    (mesh data x fsdp) and the micro-batch."""
    if c.batch_size % processes:
        raise ValueError(f"--config.batch_size={c.batch_size} is not divisible by the {processes} processes; "
                         "choose a multiple.")
    if c.batch_size % data_parallel:
        raise ValueError(f"--config.batch_size={c.batch_size} is not divisible by the {data_parallel} data-parallel "
                         "devices (mesh data x fsdp); choose a multiple.")
    if c.micro_batch_per_device == 0:
        return 1
    micro = c.micro_batch_per_device * data_parallel
    if c.batch_size % micro:
        raise ValueError(f"--config.batch_size={c.batch_size} is not a multiple of micro_batch_per_device x "
                         f"data-parallel devices = {c.micro_batch_per_device} x {data_parallel}; adjust either.")
    return c.batch_size // micro
