"""A training checkpoint -> a Hugging Face directory that transformers loads with `from_pretrained`.

    python tools/export_hf.py --workdir=runs/quickstart --out=exported/quickstart [--step=N] [--dtype=float16]

Weights, config.json and generation_config.json come from phi_jax.hf.save_pretrained; the run's tokenizer is
carried as tokenizer.json (a SentencePiece model is converted, see phi_jax/hf/tokenizer.py) with
tokenizer_config.json and special_tokens_map.json, so AutoTokenizer loads it too. Everything is written to a
temporary directory and renamed at the end. An existing --out is refused unless --overwrite, which replaces only an
empty directory or a previous export (recognised by the phi_jax_export.json it lists its files in).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32", overwrite: bool = False,
           tokenizer: str | None = None) -> Path:
    from phi_jax.checkpoint import load_model
    from phi_jax.hf import save_pretrained
    from phi_jax.hf.io import check_replaceable
    from phi_jax.hf.tokenizer import hf_tokenizer_files

    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose a new --out or pass --overwrite.")
    if Path(out).exists():
        check_replaceable(Path(out))  # before the (slow) load: --overwrite never replaces a user's own files
    model, meta, step = load_model(workdir, step, dtype="float32", param_dtype="float32")
    tokenizer = tokenizer or meta.get("data", {}).get("tokenizer_path")
    extra = {}
    if tokenizer:
        if not Path(tokenizer).exists():
            raise FileNotFoundError(f"The run's tokenizer {tokenizer} does not exist; pass --tokenizer=FILE.")
        extra = hf_tokenizer_files(tokenizer, model_max_length=model.cfg.max_position_embeddings)
    else:
        logging.warning("no tokenizer recorded in %s: exporting the weights only", workdir)
    return save_pretrained(model, out, dtype=dtype, overwrite=overwrite, extra_files=extra)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokenizer", default=None, help="default: the tokenizer recorded in the checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is empty or a previous export (which lists its files in "
                        "phi_jax_export.json); a directory holding anything else is refused, never deleted")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    out = export(args.workdir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
                 tokenizer=args.tokenizer)
    print(f"exported {args.workdir} -> {out}")


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
