"""LoRA adapters <-> PEFT adapter directories (`peft.PeftModel.from_pretrained(base, DIR)` loads them).

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors`, whose keys name the Hugging Face
module each adapter sits on: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` ([r, in]) and
`...lora_B.weight` ([out, r]), torch Linear layout. PEFT scales every update by lora_alpha / r, as phi_jax does.

phi_jax's fused q/k/v adapter (A [embed, r], B [r, 3 * heads * head_dim]) is three PEFT adapters that share A and
split B into thirds: q_proj, k_proj, v_proj. Importing requires the same: q/k/v adapters with one A (what an export
writes); adapters trained elsewhere with independent A's are refused, naming the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from phi_jax.config import PhiConfig
from phi_jax.lora import TARGET_PATHS, LoraConfig
from phi_jax.paths import is_url

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers.{i}."
# Each phi_jax target as PEFT module names (transformers' PhiForCausalLM), q/k/v splitting the fused one.
PEFT_MODULES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "dense": ("self_attn.dense",),
                "fc1": ("mlp.fc1",), "fc2": ("mlp.fc2",)}


def _key(i: int, module: str, ab: str) -> str:
    return PREFIX.format(i=i) + f"{module}.lora_{ab}.weight"


def adapter_tensors(params: dict, cfg: PhiConfig, lora: LoraConfig) -> dict[str, np.ndarray]:
    """Stacked-layout adapter parameters ("layers.attn.qkv.lora.lora_a": [layers, in, r], ...) -> PEFT's tensors."""
    out = {}
    for target in lora.targets:
        prefix = TARGET_PATHS[target]
        a = np.asarray(params[f"{prefix}.lora.lora_a"], np.float32)
        b = np.asarray(params[f"{prefix}.lora.lora_b"], np.float32)
        modules = PEFT_MODULES[target]
        for i in range(cfg.num_layers):
            for module, b_part in zip(modules, np.split(b[i], len(modules), axis=1), strict=True):
                out[_key(i, module, "A")] = np.ascontiguousarray(a[i].T)  # shared by q, k and v
                out[_key(i, module, "B")] = np.ascontiguousarray(b_part.T)
    return out


def peft_config(lora: LoraConfig, base: str) -> dict:
    """adapter_config.json of a phi_jax LoRA (PEFT's LoraConfig fields; PEFT fills the rest with its defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "target_modules": sorted(m.split(".")[-1] for t in lora.targets for m in PEFT_MODULES[t])}


def save_peft(params: dict, cfg: PhiConfig, lora: LoraConfig, out_dir: str | os.PathLike, *, base: str = "",
              overwrite: bool = False) -> Path:
    """Writes a PEFT adapter directory (local) from stacked-layout adapter parameters; `base` is recorded as
    base_model_name_or_path. Written to a temporary directory beside `out_dir`, then renamed."""
    if is_url(out_dir):
        raise ValueError(f"--peft writes a local directory, not {out_dir}: export locally, then copy it.")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new --out or pass --overwrite.")
    if out_dir.exists() and (foreign := sorted({p.name for p in out_dir.iterdir()} - {CONFIG_FILE, WEIGHTS_FILE})):
        raise FileExistsError(f"{out_dir} holds files a PEFT export did not write ({', '.join(foreign[:5])}); "
                              "overwriting replaces only an empty directory or a previous adapter export.")
    tensors = adapter_tensors(params, cfg, lora)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(lora, base), indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_peft_config(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a PEFT adapter directory: it needs {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE} (tools.export_hf --peft writes one).")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory / CONFIG_FILE} has peft_type {config.get('peft_type')!r}; only LORA adapters "
                         "can be imported.")
    return config


def _targets(config: dict, where: Path) -> tuple[str, ...]:
    """phi_jax targets of a PEFT config's target_modules (q_proj, k_proj and v_proj only together)."""
    modules = config.get("target_modules") or []
    modules = {modules} if isinstance(modules, str) else set(modules)
    names = {t: {m.split(".")[-1] for m in mods} for t, mods in PEFT_MODULES.items()}
    targets = tuple(t for t in PEFT_MODULES if names[t] <= modules)
    qkv = names["qkv"] & modules
    if qkv and qkv != names["qkv"]:
        raise ValueError(f"{where / CONFIG_FILE} adapts {sorted(qkv)} but not all of q_proj, k_proj, v_proj: phi_jax's "
                         "fused q/k/v adapter needs all three.")
    if unknown := sorted(modules - set().union(*names.values())):
        raise ValueError(f"{where / CONFIG_FILE} targets modules {unknown} that phi_jax has no adapter for "
                         f"(it adapts {sorted(set().union(*names.values()))}).")
    return targets


def lora_config_of(directory: str | os.PathLike, base_dtype=None) -> LoraConfig:
    """The phi_jax LoraConfig of a PEFT adapter directory."""
    directory = Path(directory)
    config = read_peft_config(directory)
    if config.get("use_rslora") or config.get("use_dora") or config.get("bias", "none") != "none" or \
            config.get("fan_in_fan_out"):
        raise ValueError(f"{directory / CONFIG_FILE}: use_rslora, use_dora, a trained bias and fan_in_fan_out are "
                         "not supported by phi_jax's LoRA.")
    return LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout", 0.0)), targets=_targets(config, directory),
                      base_dtype=base_dtype)


def load_peft_adapters(directory: str | os.PathLike, cfg: PhiConfig, lora: LoraConfig) -> dict:
    """A PEFT adapter directory as phi_jax's trainable LoRA parameters (a nested dict, layers stacked, float32), to
    continue training it: its rank, alpha and targets must equal the run's `lora` (checked before the weights are
    read); q/k/v must share one A."""
    directory = Path(directory)
    found = lora_config_of(directory)
    ours = (lora.rank, lora.alpha, tuple(sorted(lora.targets)))
    theirs = (found.rank, found.alpha, tuple(sorted(found.targets)))
    if ours != theirs:
        raise ValueError(f"The PEFT adapter {directory} has rank {found.rank}, alpha {found.alpha:g}, targets "
                         f"{','.join(sorted(found.targets))}; the run has rank {lora.rank}, alpha {lora.alpha:g}, "
                         f"targets {','.join(sorted(lora.targets))}. Set --config.lora.rank/alpha/targets to the "
                         "adapter's.")
    tensors = load_file(directory / WEIGHTS_FILE)
    expected = {}
    d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    shapes = {"qkv": (d, n * h), "dense": (n * h, d), "fc1": (d, f), "fc2": (f, d)}  # (in, out) per PEFT module
    for target in lora.targets:
        fan_in, fan_out = shapes[target]
        for i in range(cfg.num_layers):
            for module in PEFT_MODULES[target]:
                expected[_key(i, module, "A")] = (lora.rank, fan_in)
                expected[_key(i, module, "B")] = (fan_out, lora.rank)
    from phi_jax.hf.mapping import check_keys_and_shapes

    check_keys_and_shapes(expected, {k: v.shape for k, v in tensors.items()}, f"The PEFT adapter {directory}")
    params: dict = {}
    for target in lora.targets:
        a_layers, b_layers = [], []
        for i in range(cfg.num_layers):
            modules = PEFT_MODULES[target]
            a = tensors[_key(i, modules[0], "A")]
            if any(not np.array_equal(a, tensors[_key(i, m, "A")]) for m in modules[1:]):
                raise ValueError(f"The PEFT adapter {directory} has different lora_A matrices for q_proj, k_proj and "
                                 f"v_proj in layer {i}; phi_jax's fused q/k/v adapter shares one A (as its exports "
                                 "do). Merge the adapter into the base (peft's merge_and_unload) and fine-tune that.")
            a_layers.append(a.T)
            b_layers.append(np.concatenate([tensors[_key(i, m, "B")].T for m in modules], axis=1))
        node = params
        for part in TARGET_PATHS[target].split("."):
            node = node.setdefault(part, {})
        node["lora"] = {"lora_a": np.stack(a_layers).astype(np.float32),
                        "lora_b": np.stack(b_layers).astype(np.float32)}
    return params


def export_peft(workdir: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
                overwrite: bool = False) -> Path:
    """A LoRA run's newest (or `step`) adapters as a PEFT adapter directory for the base model its checkpoint names
    (recorded as base_model_name_or_path; `peft.PeftModel.from_pretrained(base, out_dir)` loads it)."""
    import logging

    from phi_jax.checkpoint import read_meta
    from phi_jax.lora import is_adapter_path, load_lora_workdir
    from phi_jax.model import stacked_params

    if is_url(out_dir):
        raise ValueError(f"--peft writes a local directory, not {out_dir}: export locally, then copy it.")
    meta = read_meta(workdir, step)
    if "lora" not in meta:
        raise ValueError(f"{workdir} is a full-training run: it has no adapters for --peft; export it without --peft.")
    if Path(out_dir).exists() and not overwrite:  # before the (slow) load
        raise FileExistsError(f"{out_dir} already exists; choose a new --out or pass --overwrite.")
    model, meta, _ = load_lora_workdir(workdir, step)
    base = meta["lora"]["base"]
    if not base:
        logging.getLogger("phi_jax").warning("%s trained on a fresh (seeded) base, not a Hugging Face model: the "
                                             "adapter directory names no base model", workdir)
    params = {p: v for p, v in stacked_params(model).items() if is_adapter_path(p)}
    return save_peft(params, model.cfg, model.lora, out_dir, base=base, overwrite=overwrite)
