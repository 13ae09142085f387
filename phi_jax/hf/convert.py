"""Between training workdirs and Hugging Face directories: `export_hf` (any model -> a directory transformers loads,
with its tokenizer) and `import_hf` (a Hugging Face model -> a step-0 checkpoint that training continues from).
tools/export_hf.py and tools/import_hf.py are their command lines.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import ml_collections
from etils import epath

from phi_jax.config import PhiConfig
from phi_jax.hf.io import check_replaceable, save_pretrained
from phi_jax.hf.tokenizer import hf_tokenizer_files
from phi_jax.loading import from_pretrained, resolve, tokenizer_file
from phi_jax.paths import user_path

log = logging.getLogger("phi_jax")


def export_hf(model: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None, dtype: str = "float32",
              overwrite: bool = False, tokenizer: str | os.PathLike | None = None) -> os.PathLike:
    """Writes `model` (a workdir's newest or `step` checkpoint, a Hugging Face directory or a Hub id) to `out`
    (local or gs://) as a directory that transformers' `from_pretrained` and `AutoTokenizer` load.

    The tokenizer is the model's own unless `tokenizer` names one (a SentencePiece model is converted to
    tokenizer.json, see phi_jax/hf/tokenizer.py). An existing `out` is refused unless `overwrite`, which replaces
    only an empty directory or a previous export (the phi_jax_export.json it lists its files in); both are checked
    before the model is read.
    """
    out = user_path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose a new --out or pass --overwrite.")
    if out.exists():
        check_replaceable(out)  # before the (slow) load: --overwrite never replaces a user's own files
    source = resolve(model)
    tokenizer = tokenizer or tokenizer_file(source, step, required=False)
    loaded = from_pretrained(source, step=step)  # float32: `dtype` applies when writing
    extra = {}
    if tokenizer:
        if not user_path(tokenizer).exists():
            raise FileNotFoundError(f"The tokenizer {tokenizer} does not exist; pass --tokenizer=FILE.")
        extra = hf_tokenizer_files(tokenizer, model_max_length=loaded.cfg.max_position_embeddings)
    else:
        log.warning("%s has no tokenizer: exporting the weights only (pass --tokenizer=FILE to add one)", model)
    return save_pretrained(loaded, out, dtype=dtype, overwrite=overwrite, extra_files=extra)


def load_run_config(path: str | os.PathLike | None) -> ml_collections.ConfigDict:
    """A configs/*.py run config's `get_config()`, or the defaults (phi_jax.run_config) when `path` is None."""
    from phi_jax.run_config import base_config

    if not path:
        return base_config()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Run config {path} does not exist; pass a configs/*.py file.")
    spec = importlib.util.spec_from_file_location("run_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def import_hf(model: str | os.PathLike, workdir: str | os.PathLike, *,
              config: str | os.PathLike | None = None) -> epath.Path:
    """Writes a Hugging Face model (a directory, local or gs://, or a Hub id) into `workdir` as a step-0 checkpoint:
    its parameters in the run config's param_dtype, a fresh optimizer state from the run config's optimizer
    settings, and metadata recording the architecture, the run config and the model's tokenizer. With `config`, the
    config's preset must have the model's architecture, or training would refuse to resume. Returns the
    checkpoints directory."""
    import jax
    from flax import nnx

    from phi_jax.checkpoint import Checkpointer
    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import make_mesh
    from phi_jax.train import compute_options
    from phi_jax.train_state import create_train_state

    c = load_run_config(config)
    source = resolve(model)
    if source.is_workdir:
        raise ValueError(f"{model} is a training workdir already; import_hf reads a Hugging Face directory or Hub id.")
    compute = compute_options(c)
    loaded = from_pretrained(source, compute)
    cfg = loaded.cfg
    if config and (preset := PhiConfig.preset(c.model)) != cfg:
        raise ValueError(f"{model} does not have the architecture of {config}'s model {c.model!r} (checkpoint vs "
                         "run: " + "; ".join(cfg.diff(preset)) + "); use a config with a matching preset.")
    ckpt = Checkpointer(workdir, async_save=False)
    if steps := ckpt.all_steps():
        ckpt.close()
        raise FileExistsError(f"{workdir} already has checkpoints {steps}; use a new --workdir.")
    tx = make_optimizer(c.learning_rate, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                        warmup_steps=c.warmup_steps, grad_clip_norm=c.grad_clip_norm)
    mesh = make_mesh(devices=jax.devices()[:1])
    state = create_train_state(cfg, tx, mesh, compute=compute)
    params = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    params = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), params, state.params)
    state = state.replace(params=params, opt_state=tx.init(params))
    tokenizer = tokenizer_file(source, required=False)
    meta = {"model": cfg.to_dict(), "run": c.to_dict(),
            "data": {"tokenizer_path": None if tokenizer is None else os.fspath(tokenizer),
                     "imported_from": os.fspath(source.path)}}
    ckpt.save(0, state, meta)
    ckpt.close()
    return ckpt.directory
