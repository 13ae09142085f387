"""Reading and writing Hugging Face phi directories (safetensors, single-file or sharded), torch-free."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from phi_jax.config import DTYPES, PhiConfig
from phi_jax.hf import mapping
from phi_jax.hf.config import phi_config_from_hf, phi_config_to_hf
from phi_jax.model import Phi, abstract_model
from phi_jax.paths import is_url, user_path

log = logging.getLogger("phi_jax")

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
MANIFEST = "phi_jax_export.json"  # marks a directory save_pretrained wrote, so that overwrite may replace it
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def param_paths(model: Phi) -> dict[str, nnx.Variable]:
    """The model's parameters by dotted path ("layers.attn.qkv.kernel" -> Variable)."""
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


class SafetensorsDir:
    """Lazy access to the tensors of a Hugging Face directory (one file, or shards with an index)."""

    def __init__(self, path: Path):
        index = path / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            root = path.resolve()
            if outside := sorted({f for f in weight_map.values() if not (root / f).resolve().is_relative_to(root)}):
                raise ValueError(f"{index} names shard files outside {path}: {outside[:5]}; a shard name must be a "
                                 "file inside the model's directory.")
            files = {path / f for f in weight_map.values()}
            if missing := sorted(str(f.name) for f in files if not f.exists()):
                raise FileNotFoundError(f"{index} names shard files that are not in {path}: {missing}.")
        elif (path / SINGLE_FILE).exists():
            weight_map, files = None, {path / SINGLE_FILE}
        else:
            hint = (" It holds PyTorch .bin weights: convert them to safetensors first (phi_jax never imports torch)."
                    if any(path.glob("*.bin")) else "")
            raise FileNotFoundError(f"No {SINGLE_FILE} or {INDEX_FILE} in {path}.{hint}")
        self._handles = {f: safe_open(f, framework="np") for f in files}
        self.where = {key: f for f, h in self._handles.items() for key in h.keys()}  # noqa: SIM118 - safe_open is not iterable
        if weight_map is not None and (stray := sorted(set(weight_map) ^ set(self.where))):
            raise ValueError(f"{index} and the shard files disagree about tensors {stray[:10]}.")
        self.shapes = {k: tuple(self._handles[f].get_slice(k).get_shape()) for k, f in self.where.items()}

    def get(self, key: str) -> np.ndarray:
        return self._handles[self.where[key]].get_tensor(key)


def load_hf_config(path: str | os.PathLike, **overrides) -> PhiConfig:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass a Hugging Face phi model directory.")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"No config.json in {path}: a Hugging Face model directory needs one.")
    return phi_config_from_hf(json.loads(config_file.read_text()), **overrides)


def from_pretrained(path: str | os.PathLike, dtype: str = "float32", param_dtype: str = "float32",
                    **config_overrides) -> Phi:
    """Loads a Hugging Face phi directory (native, MixFormerSequential or 2023 remote-code layout).

    `dtype` is the compute dtype, `param_dtype` the storage dtype; other PhiConfig fields (attention_impl, ...)
    may be overridden. Every tensor's key and shape is checked before any conversion.
    A training workdir (a directory with checkpoints/) loads its newest checkpoint's parameters instead.
    """
    if (user_path(path) / "checkpoints").is_dir():  # a workdir, local or gs://
        from phi_jax.checkpoint import load_model

        return load_model(path, dtype=dtype, param_dtype=param_dtype, **config_overrides)[0]
    if is_url(path):
        raise ValueError(f"{path}: Hugging Face directories are read from local disk only; copy it first "
                         "(gcloud storage cp -r URL DIR).")
    path = Path(path)
    cfg = load_hf_config(path, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    tensors = SafetensorsDir(path)
    layout = mapping.detect_layout(tensors.shapes)
    model = abstract_model(cfg)
    variables = param_paths(model)
    shapes = {p: tuple(v.shape) for p, v in variables.items()}
    mapping.check_keys_and_shapes(mapping.expected_hf_shapes(layout, cfg, shapes), tensors.shapes, str(path))
    converted = mapping.hf_to_ours(layout, cfg, shapes, tensors.get)
    for p, var in variables.items():
        var.set_value(jax.numpy.asarray(converted.pop(p), dtype=DTYPES[param_dtype]))
    log.info("loaded %s (%s layout, %d layers, %s params)", path, layout.name, cfg.num_layers, param_dtype)
    return model


def _shard(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, size = [{}], 0
    for key, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes
    return shards


def check_replaceable(out_dir: Path) -> None:
    """overwrite=True replaces only an empty directory or a previous export: never a user's own files."""
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output path.")
    entries = {p.name for p in out_dir.iterdir()}
    if not entries:
        return
    owned = set()
    if (out_dir / MANIFEST).is_file():
        owned = {MANIFEST, *json.loads((out_dir / MANIFEST).read_text()).get("files", [])}
    if foreign := sorted(entries - owned):
        what = "is not a phi_jax export" if not owned else "holds files the previous export did not write"
        raise FileExistsError(f"{out_dir} {what} ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                              "overwriting replaces only an empty directory or a previous export. Move those files "
                              "or choose another output directory.")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_pretrained(model: Phi, out_dir: str | os.PathLike, dtype: str = "float32", *,
                    max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False,
                    extra_files: Mapping[str, str | bytes] | None = None) -> Path:
    """Writes a native PhiForCausalLM directory that `transformers` loads with no missing or unexpected weights.

    Everything is written to a temporary directory beside `out_dir` and renamed at the end, so a failure never
    leaves a half-written model. `extra_files` (name -> content) adds e.g. tokenizer files. A manifest
    (phi_jax_export.json) lists the files written: `overwrite=True` replaces only an empty directory or such an
    export, never a directory holding anything else. The files get the permissions the umask gives new files.
    """
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(NUMPY_DTYPES)}.")
    model.stack_layers()  # the mapping reads stacked layers; a model a Sampler unstacked is stacked back (no-op else)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new directory or pass overwrite=True.")
    if out_dir.exists():
        check_replaceable(out_dir)
    cfg = model.cfg
    params = {p: np.asarray(jax.device_get(v[...])) for p, v in param_paths(model).items()}
    tensors = {k: t.astype(NUMPY_DTYPES[dtype]) for k, t in mapping.ours_to_hf(cfg, params).items()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would keep the export from everyone else
    try:
        shards = _shard(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(phi_config_to_hf(cfg, dtype), indent=2) + "\n")
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({"written_by": "phi_jax.hf.save_pretrained", "files": files},
                                               indent=2) + "\n")
        for f in tmp.iterdir():  # safetensors writes its files owner-only
            f.chmod(0o666 & ~_umask())
        if out_dir.exists():  # overwrite=True: swap, keeping the old copy until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except (OSError, SafetensorError) as e:  # disk full, a file-size limit, ... (safetensors wraps the OS error)
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "the previous export is intact" if out_dir.exists() else "nothing was written"
        raise OSError(f"Writing {out_dir} failed ({e}); {kept}. Free space (or raise the quota / file-size limit) "
                      "and retry.") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s (%d tensors, %d file(s), %s)", out_dir, len(tensors), len(shards), dtype)
    return out_dir
