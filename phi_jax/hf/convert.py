"""From any phi model to a Hugging Face directory: `export_hf` (a workdir, a Hugging Face directory or a Hub id ->
a directory that transformers loads, with its tokenizer). tools/export_hf.py is its command line; training starts
from Hugging Face weights with `--config.init_from_hf` (phi_jax.trainer.Trainer.init_state).
"""

from __future__ import annotations

import logging
import os

from phi_jax.checkpoint import read_meta
from phi_jax.data.tokenizer import load_tokenizer
from phi_jax.hf.io import check_replaceable, save_pretrained
from phi_jax.hf.tokenizer import hf_tokenizer_files
from phi_jax.loading import check_tokenizer_fits, from_pretrained, load_config, resolve, tokenizer_file
from phi_jax.paths import user_path

log = logging.getLogger("phi_jax")


def export_hf(model: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None, dtype: str = "float32",
              overwrite: bool = False, tokenizer: str | os.PathLike | None = None,
              merge_lora: bool = False) -> os.PathLike:
    """Writes `model` (a workdir's newest or `step` checkpoint, a Hugging Face directory or a Hub id) to `out`
    (local or gs://) as a directory that transformers' `from_pretrained` and `AutoTokenizer` load.

    The tokenizer is the model's own unless `tokenizer` names one (a SentencePiece model is converted to
    tokenizer.json, see phi_jax/hf/tokenizer.py). An existing `out` is refused unless `overwrite`, which replaces
    only an empty directory or a previous export (the phi_jax_export.json it lists its files in); both are checked
    before the model is read. A LoRA run's workdir needs `merge_lora`: the adapters merged into its base model's
    weights (W + alpha / r * A B) give an ordinary phi directory (phi_jax/hf/peft.py exports the adapters alone).
    """
    out = user_path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose a new --out or pass --overwrite.")
    if out.exists():
        check_replaceable(out)  # before the (slow) load: --overwrite never replaces a user's own files
    source = resolve(model)
    is_lora = source.is_workdir and "lora" in read_meta(source.path, step)
    if is_lora != merge_lora:
        raise ValueError(f"{model} is a LoRA run: pass --merge_lora (its adapters merged into the base model's "
                         "weights) or --peft (a PEFT adapter directory)." if is_lora else
                         f"{model} holds no LoRA adapters to merge: export it without --merge_lora.")
    given = tokenizer is not None
    tokenizer = tokenizer or tokenizer_file(source, step, required=False)
    if tokenizer:  # checked before the (slow) weights: it exists, it is a tokenizer, its ids fit the model
        if not user_path(tokenizer).exists():
            raise FileNotFoundError(f"The tokenizer {tokenizer} does not exist; pass --tokenizer=FILE.")
        check_tokenizer_fits(load_tokenizer(tokenizer), load_config(source, step).vocab_size, given=given)
    loaded = from_pretrained(source, step=step)  # float32 (a LoRA run's merged); `dtype` applies when writing
    extra = {}
    if tokenizer:
        extra = hf_tokenizer_files(tokenizer, model_max_length=loaded.cfg.max_position_embeddings)
    else:
        log.warning("%s has no tokenizer: exporting the weights only (pass --tokenizer=FILE to add one)", model)
    return save_pretrained(loaded, out, dtype=dtype, overwrite=overwrite, extra_files=extra)
