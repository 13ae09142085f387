"""Loading a phi model from anything a user names: `phi_jax.from_pretrained("microsoft/phi-1_5")`.

Three sources are accepted, and `resolve` is the one place that tells them apart:
- a training workdir (it holds checkpoints/): the newest (or a chosen) checkpoint's parameters, read-only;
- a Hugging Face phi directory (config.json and safetensors), local or gs://;
- a Hugging Face Hub id ("microsoft/phi-1_5"), downloaded into (or, offline, found in) the Hub cache by
  `huggingface_hub.snapshot_download`, then read as a directory.
`tokenizer_file` is the one place that finds a source's tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

from etils import epath

from phi_jax.config import Compute, PhiConfig
from phi_jax.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_in
from phi_jax.model import Phi, from_params, stacked_params, to_layout
from phi_jax.paths import is_url, user_path

log = logging.getLogger("phi_jax")

WORKDIR, HF_DIRECTORY = "workdir", "huggingface"
ACCEPTED = ("a training workdir (it holds checkpoints/), a Hugging Face phi directory (config.json and "
            "model.safetensors; local or gs://), or a Hugging Face Hub id such as microsoft/phi-1_5")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # ORG/NAME; a local path that exists is taken first
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model"]  # never the PyTorch .bin copies a Hub repo may hold


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved model source: what it is, where its files are, and how the user named it."""

    kind: str  # WORKDIR | HF_DIRECTORY
    path: epath.Path
    name: str

    @property
    def is_workdir(self) -> bool:
        return self.kind == WORKDIR


def resolve(path_or_id: Source | str | os.PathLike) -> Source:
    """What `path_or_id` names: a workdir, a Hugging Face directory, or a Hub id (downloaded, or found in the Hub
    cache when offline); a Source is returned as it is. Anything else is a FileNotFoundError that lists the accepted
    forms."""
    if isinstance(path_or_id, Source):
        return path_or_id
    name = os.fspath(path_or_id)
    path = user_path(name)
    if (path / "checkpoints").is_dir():
        return Source(WORKDIR, path, name)
    if (path / "config.json").is_file():
        return Source(HF_DIRECTORY, path, name)
    if path.is_dir():
        raise FileNotFoundError(f"No config.json (a Hugging Face directory) and no checkpoints/ (a training workdir) "
                                f"in {name}: pass {ACCEPTED}.")
    if path.exists() or is_url(name) or not HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"{name} is not a model directory{' (it does not exist)' if not path.exists() else ''}"
                                f": pass {ACCEPTED}.")
    return Source(HF_DIRECTORY, _hub_snapshot(name), name)


def _hub_snapshot(repo_id: str) -> epath.Path:
    """The local snapshot of a Hub model (HF_HUB_CACHE; HF_HUB_OFFLINE=1 reads the cache without the network)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:  # offline without a cached copy, no such repo, no access, no network, ...
        reason = " ".join(str(e).split())[:300]
        raise FileNotFoundError(f"{repo_id} is not a local path, and the Hugging Face Hub did not provide it "
                                f"({type(e).__name__}: {reason}). Pass {ACCEPTED}.") from e
    log.info("%s: Hub snapshot %s", repo_id, snapshot)
    return epath.Path(snapshot)


def load_config(source: Source | str | os.PathLike, step: int | None = None) -> PhiConfig:
    """A source's architecture, without reading its weights (to check it before loading them)."""
    source = resolve(source)
    if source.is_workdir:
        from phi_jax.checkpoint import read_meta

        return PhiConfig.from_dict(read_meta(source.path, step)["model"])
    from phi_jax.hf.io import load_hf_config

    return load_hf_config(source.path)


def check_readable(path_or_id: Source | str | os.PathLike, step: int | None = None) -> PhiConfig:
    """A source's architecture, after the checks that need no weights: its config (a workdir: the checkpoint's
    metadata) parses, and a local Hugging Face directory's safetensors headers and index are sound (a bucket's
    files are checked when they are read: reading them is reading the weights). For a command that reads the
    weights only after long work (training's init_from_hf, read after compiling): one line naming a damaged file,
    at start-up."""
    source = resolve(path_or_id)
    cfg = load_config(source, step)
    if not source.is_workdir and not is_url(source.path):
        from phi_jax.hf.io import SafetensorsDir

        SafetensorsDir(source.path)  # opens each file's header only (memory-mapped)
    return cfg


def from_pretrained(path_or_id: Source | str | os.PathLike, compute: Compute = Compute(),
                    step: int | None = None, *, scan_layers: bool = True) -> Phi:
    """The model of a training workdir (newest checkpoint, or `step`), a Hugging Face directory (local or gs://) or
    a Hub id, run as `compute` says (parameters cast to compute.param_dtype), in the layer layout `scan_layers`
    (phi_jax/model.py): True (stacked) for training and scoring, False (one Block per layer) for decoding."""
    source = resolve(path_or_id)
    if source.is_workdir and _is_lora_run(source, step):  # a LoRA run: its adapters merged into its base model
        from phi_jax.lora import load_lora_workdir, merge_lora

        return to_layout(merge_lora(load_lora_workdir(source.path, step, compute)[0]), scan_layers=scan_layers)
    if source.is_workdir:
        from phi_jax.checkpoint import load_model

        model = load_model(source.path, step, compute)[0]  # stacked, as checkpoints hold it
        if scan_layers:
            return model
        cfg, params = model.cfg, stacked_params(model)
        del model  # `params` holds the only references: from_params frees each stacked array once it is split
        return from_params(cfg, compute, params, scan_layers=False)
    if step is not None:
        raise ValueError(f"step={step} chooses a training workdir's checkpoint; {source.name} is a Hugging Face "
                         "model, which has one set of weights.")
    from phi_jax.hf.io import load_hf_directory

    return load_hf_directory(source.path, compute, scan_layers=scan_layers)


def _is_lora_run(source: Source, step: int | None) -> bool:
    from phi_jax.checkpoint import read_meta

    return "lora" in read_meta(source.path, step)


def tokenizer_file(source: Source | str | os.PathLike, step: int | None = None, *,
                   required: bool = True) -> epath.Path | None:
    """A source's tokenizer: the one its checkpoint's metadata records (a workdir), or the tokenizer.json /
    tokenizer.model it holds (a Hugging Face directory). None when it has none and `required` is False."""
    source = resolve(source)
    if source.is_workdir:
        from phi_jax.checkpoint import read_meta

        recorded = read_meta(source.path, step).get("data", {}).get("tokenizer_path")  # read-only
        if recorded:
            if not user_path(recorded).exists():
                raise FileNotFoundError(f"The checkpoint metadata in {source.name} names tokenizer {recorded}, which "
                                        "does not exist; pass --tokenizer=FILE.")
            return user_path(recorded)
        found, where = None, f"the checkpoint metadata in {source.name} records no tokenizer"
    else:
        found, where = tokenizer_in(source.path), f"no tokenizer.json or tokenizer.model in {source.name}"
    if found is None and required:
        raise FileNotFoundError(f"{where[0].upper()}{where[1:]}; pass --tokenizer=FILE.")
    return found


def load(path_or_id: str | os.PathLike, *, compute: Compute = Compute(), step: int | None = None,
         tokenizer: str | os.PathLike | None = None, scan_layers: bool = True) -> tuple[Phi, Tokenizer]:
    """(model, tokenizer) of any source (see `resolve`); `tokenizer` replaces the source's own; `scan_layers` as in
    `from_pretrained`."""
    source = resolve(path_or_id)
    tok = load_tokenizer(tokenizer or tokenizer_file(source, step))  # before the (slow) weights
    check_tokenizer_fits(tok, load_config(source, step).vocab_size, given=tokenizer is not None)
    return from_pretrained(source, compute, step, scan_layers=scan_layers), tok


def check_tokenizer_fits(tok: Tokenizer, model_vocab_size: int, *, given: bool = True) -> None:
    """Every id of the tokenizer must have a row in the model's embedding (a larger tokenizer is another model's).
    A smaller one is normal (phi-1.5 embeds 51200 ids for its tokenizer's 50295); generate keeps to its ids."""
    if tok.vocab_size > model_vocab_size:
        what = f"--tokenizer={tok.path}" if given else f"The model's tokenizer {tok.path}"
        raise ValueError(f"{what} has {tok.vocab_size} ids but the model embeds only {model_vocab_size}: it is not "
                         "this model's tokenizer; pass the one the model was trained with.")
