"""Reading and writing Hugging Face phi directories (safetensors, single-file or sharded), torch-free."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import jax
import numpy as np
import safetensors.numpy
from etils import epath
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from phi_jax.config import Compute, PhiConfig, as_dtype
from phi_jax.hf import mapping
from phi_jax.hf.config import phi_config_from_hf, phi_config_to_hf
from phi_jax.model import Phi, abstract_model, from_params, param_paths
from phi_jax.paths import is_url, user_path

log = logging.getLogger("phi_jax")

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "rotary_dim",
              "max_position_embeddings")
MANIFEST = "phi_jax_export.json"  # marks a directory save_pretrained wrote, so that overwrite may replace it


class _File:
    """One safetensors file: opened lazily (memory-mapped) on local disk; read whole from a bucket, since the
    safetensors library opens local files only (its numpy `load` parses the bytes)."""

    def __init__(self, path: epath.Path):
        try:
            if is_url(path):
                self._tensors, self._handle = safetensors.numpy.load(path.read_bytes()), None
            else:
                self._tensors, self._handle = None, safe_open(os.fspath(path), framework="np")
        except SafetensorError as e:  # truncated, empty, garbage: "Error while deserializing header: ..."
            raise ValueError(f"{path} is not a valid safetensors file ({' '.join(str(e).split())[:200]}): it is "
                             "damaged or incomplete; download or export it again.") from None

    def keys(self) -> list[str]:
        return list(self._tensors) if self._handle is None else list(self._handle.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        if self._handle is None:
            return tuple(self._tensors[key].shape)
        return tuple(self._handle.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        return self._tensors[key] if self._handle is None else self._handle.get_tensor(key)


class SafetensorsDir:
    """The tensors of a Hugging Face directory (one file, or shards with an index), local or gs://."""

    def __init__(self, path: str | os.PathLike):
        path = user_path(path)
        index = path / INDEX_FILE
        if index.exists():
            weight_map = read_json_file(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index} has no \"weight_map\" object (tensor name -> shard file): it is damaged; "
                                 "download or export the model again.")
            # A name, not a path: no absolute names and no "..". (Checked by name, not by resolving links: a Hub
            # snapshot's files are links into the cache's blobs/ directory.)
            if outside := sorted({f for f in weight_map.values()
                                  if PurePosixPath(f).is_absolute() or ".." in PurePosixPath(f).parts}):
                raise ValueError(f"{index} names shard files outside {path}: {outside[:5]}; a shard name must be a "
                                 "file inside the model's directory.")
            names = sorted(set(weight_map.values()))
            if missing := [f for f in names if not (path / f).exists()]:
                raise FileNotFoundError(f"{index} names shard files that are not in {path}: {missing}.")
        elif (path / SINGLE_FILE).exists():
            weight_map, names = None, [SINGLE_FILE]
        else:
            hint = (" It holds PyTorch .bin weights: convert them to safetensors first (phi_jax never imports torch)."
                    if any(path.glob("*.bin")) else "")
            raise FileNotFoundError(f"No {SINGLE_FILE} or {INDEX_FILE} in {path}.{hint}")
        self._files = {name: _File(path / name) for name in names}
        self.where = {key: name for name, f in self._files.items() for key in f.keys()}  # noqa: SIM118
        if weight_map is not None and (stray := sorted(set(weight_map) ^ set(self.where))):
            raise ValueError(f"{index} and the shard files disagree about tensors {stray[:10]}.")
        self.shapes = {k: self._files[name].shape(k) for k, name in self.where.items()}

    def get(self, key: str) -> np.ndarray:
        return self._files[self.where[key]].get(key)


def read_json_file(path: epath.Path) -> dict:
    """A JSON object from `path`; anything else (bad JSON, another type, bytes that are not text) is one ValueError
    naming the file."""
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON ({' '.join(str(e).split())[:120]}): it is damaged; download or "
                         "export the model again.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object: it is damaged; download or "
                         "export the model again.")
    return value


def load_hf_config(path: str | os.PathLike) -> PhiConfig:
    """The PhiConfig of a Hugging Face directory's config.json (local or gs://)."""
    path = user_path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass a Hugging Face phi model directory.")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"No config.json in {path}: a Hugging Face model directory needs one.")
    try:
        cfg = phi_config_from_hf(read_json_file(config_file))
        if wrong := [f"{f}={getattr(cfg, f)!r}" for f in INT_FIELDS
                     if isinstance(getattr(cfg, f), bool) or not isinstance(getattr(cfg, f), int)]:
            raise TypeError(f"{', '.join(wrong)} must be integers")
        return cfg
    except (TypeError, AttributeError) as e:  # a value of the wrong type (a string for a size, ...)
        raise ValueError(f"{config_file} holds a value of the wrong type ({e}): it is damaged; download or export "
                         "the model again.") from None
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if str(config_file) in msg else f"{config_file}: {msg}") from None


def load_hf_directory(path: str | os.PathLike, compute: Compute = Compute(), *, scan_layers: bool = True) -> Phi:
    """A Hugging Face phi directory (native, MixFormerSequential or 2023 remote-code layout; local or gs://), run
    as `compute` says (its parameters cast to compute.param_dtype), in the layer layout `scan_layers`. Every
    tensor's key and shape is checked before any conversion. `phi_jax.from_pretrained` takes any model source and
    calls this for a directory."""
    path = user_path(path)
    cfg = load_hf_config(path)
    tensors = SafetensorsDir(path)
    layout = mapping.detect_layout(tensors.shapes)
    shapes = {p: tuple(v.shape) for p, v in param_paths(abstract_model(cfg, compute)).items()}  # stacked names
    mapping.check_keys_and_shapes(mapping.expected_hf_shapes(layout, cfg, shapes), tensors.shapes, str(path))
    model = from_params(cfg, compute, mapping.hf_to_ours(layout, cfg, shapes, tensors.get), scan_layers=scan_layers)
    log.info("loaded %s (%s layout, %d layers, %s params)", path, layout.name, cfg.num_layers,
             compute.param_dtype.name)
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


def check_replaceable(out_dir: str | os.PathLike) -> set[str]:
    """overwrite=True replaces only an empty directory or a previous export: never a user's own files. Returns the
    names the previous export owns (none for an empty directory)."""
    out_dir = user_path(out_dir)
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output path.")
    entries = {p.name for p in out_dir.iterdir()}
    if not entries:
        return set()
    owned = set()
    if (out_dir / MANIFEST).is_file():
        listed = read_json_file(out_dir / MANIFEST).get("files", [])
        owned = {MANIFEST, *(f for f in listed if isinstance(f, str))} if isinstance(listed, list) else {MANIFEST}
    if foreign := sorted(entries - owned):
        what = "is not a phi_jax export" if not owned else "holds files the previous export did not write"
        raise FileExistsError(f"{out_dir} {what} ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                              "overwriting replaces only an empty directory or a previous export. Move those files "
                              "or choose another output directory.")
    return entries


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_export(tensors: Mapping[str, np.ndarray], cfg: PhiConfig, dtype: str, directory: Path,
                  max_shard_bytes: int, extra_files: Mapping[str, str | bytes]) -> int:
    """Writes the whole export into an empty local `directory`, the manifest last; returns the number of shards."""
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(phi_config_to_hf(cfg, dtype), indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name, content in extra_files.items():
        (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    files = sorted(p.name for p in directory.iterdir())
    (directory / MANIFEST).write_text(json.dumps({"written_by": "phi_jax.hf.save_pretrained", "files": files},
                                                 indent=2) + "\n")
    for f in directory.iterdir():  # safetensors writes its files owner-only
        f.chmod(0o666 & ~_umask())
    return len(shards)


def save_pretrained(model: Phi, out_dir: str | os.PathLike, dtype: str = "float32", *,
                    max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False,
                    extra_files: Mapping[str, str | bytes] | None = None) -> Path | epath.Path:
    """Writes a native PhiForCausalLM directory (local or gs://) that `transformers` loads with no missing or
    unexpected weights.

    Nothing is left half-written: locally, everything goes to a temporary directory beside `out_dir`, renamed at the
    end; in a bucket, see `_upload`. `extra_files` (name -> content) adds e.g. tokenizer files. A manifest
    (phi_jax_export.json) lists the files written: `overwrite=True` replaces only an empty directory or such an
    export, never a directory holding anything else. Local files get the permissions the umask gives new files.
    Returns the directory: a pathlib.Path on local disk, an epath.Path in a bucket.
    """
    dtype = as_dtype(dtype).name  # a ValueError naming the choices, before any work
    out_dir = user_path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new directory or pass overwrite=True.")
    previous = check_replaceable(out_dir) if out_dir.exists() else None
    cfg = model.cfg
    params = {p: np.asarray(jax.device_get(v[...])) for p, v in param_paths(model).items()}  # either layout

    def get(name: str, layer: int | None) -> np.ndarray:  # a stacked-layout name, and the layer of a per-layer one
        if layer is None:
            return params[name]
        return params[name][layer] if name in params else params[name.replace("layers.", f"layers.{layer}.", 1)]

    tensors = {k: t.astype(as_dtype(dtype)) for k, t in mapping.ours_to_hf(cfg, get).items()}
    extra_files = extra_files or {}

    if is_url(out_dir):
        # Written on local disk first (a failure there touches nothing in the bucket), then uploaded.
        with tempfile.TemporaryDirectory(prefix="phi_jax-export-") as tmp:
            try:
                n_shards = _write_export(tensors, cfg, dtype, Path(tmp), max_shard_bytes, extra_files)
            except (OSError, SafetensorError) as e:
                raise OSError(f"Writing {out_dir} failed while preparing it on local disk ({e}); nothing was "
                              "written to the bucket. Free space in the temporary directory (TMPDIR) and retry."
                              ) from e
            _upload(Path(tmp), out_dir, previous or set())
        log.info("saved %s (%d tensors, %d file(s), %s)", out_dir, len(tensors), n_shards, dtype)
        return out_dir

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would keep the export from everyone else
    try:
        n_shards = _write_export(tensors, cfg, dtype, tmp, max_shard_bytes, extra_files)
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
    log.info("saved %s (%d tensors, %d file(s), %s)", out_dir, len(tensors), n_shards, dtype)
    return out_dir


def _upload(local: Path, out_dir: epath.Path, previous: set[str]) -> None:
    """Copies a finished export from `local` into a bucket so that a reader never takes a partial upload for a model.

    A bucket cannot rename a directory: a "rename" copies and deletes each object, no more atomic than the upload
    itself, so a temporary prefix plus rename would double the traffic and still leave a window. What a bucket does
    guarantee is that each object appears whole or not at all. So the order is what makes it safe:
    1. the manifest first, listing this export's files and any previous export's: whatever a failure leaves is
       then owned by an export, and `overwrite=True` can replace it on a retry;
    2. a previous export's config.json is deleted: without config.json a directory is not a model (phi_jax and
       transformers both refuse it), so old and new weights are never read together;
    3. the weights, the tokenizer and the other files;
    4. config.json last: a directory that has it has every file it needs;
    5. the previous export's files this one did not rewrite are deleted, and the manifest is rewritten to list
       this export's files only.
    On a failure the objects this upload created are deleted (a fresh `out_dir`: nothing is left), or, when
    replacing, the directory is left without config.json, which a retry with overwrite=True replaces.
    """
    files = json.loads((local / MANIFEST).read_text())["files"]
    claim = {"written_by": "phi_jax.hf.save_pretrained", "files": sorted((set(files) | previous) - {MANIFEST})}
    uploaded: list[str] = []
    try:
        (out_dir / MANIFEST).write_text(json.dumps(claim, indent=2) + "\n")
        uploaded.append(MANIFEST)
        if "config.json" in previous:
            (out_dir / "config.json").unlink()
        for name in [f for f in files if f != "config.json"] + ["config.json"]:
            with (local / name).open("rb") as src, (out_dir / name).open("wb") as dst:  # streamed: shards are GBs
                shutil.copyfileobj(src, dst, 64 * 1024**2)
            uploaded.append(name)
        for name in sorted(previous - set(files) - {MANIFEST}):
            (out_dir / name).unlink(missing_ok=True)
        (out_dir / MANIFEST).write_bytes((local / MANIFEST).read_bytes())
    except Exception as e:
        if previous:
            kept = ("the previous export was partly replaced and has no config.json now, so nothing loads it; "
                    "rerun with overwrite to replace it")
        else:
            for name in reversed(uploaded):  # config.json (if it got there) goes first, the manifest last
                try:
                    (out_dir / name).unlink()
                except Exception:  # best effort: the error below says what may be left
                    kept = f"removing the partial upload failed too: delete {out_dir}"
                    break
            else:
                kept = "nothing was left in the bucket"
        raise OSError(f"Uploading {out_dir} failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                      f"{kept}.") from e
