"""Any phi model -> a Hugging Face directory that transformers loads with `from_pretrained`.

    python -m tools.export_hf --model=runs/quickstart --out=exported/quickstart [--step=N] [--dtype=float16]
    python -m tools.export_hf --model=runs/lora --out=exported/merged --merge_lora   # a LoRA run, merged
    python -m tools.export_hf --model=runs/lora --out=exported/adapter --peft         # its adapters for PEFT

The logic is phi_jax.hf.convert.export_hf: weights, config.json and generation_config.json, and the model's
tokenizer as tokenizer.json (a SentencePiece model is converted) with tokenizer_config.json and
special_tokens_map.json, so AutoTokenizer loads it too. --out may be local or gs://; nothing is left half-written.
An existing --out is refused unless --overwrite, which replaces only an empty directory or a previous export
(recognised by the phi_jax_export.json it lists its files in).

A LoRA run (--config.lora.rank > 0) exports either merged (--merge_lora: ordinary phi weights, W + alpha/r * A B)
or as a PEFT adapter directory (--peft: adapter_config.json and adapter_model.safetensors, which
`peft.PeftModel.from_pretrained(base_model, DIR)` loads on the base model the run names; phi_jax/hf/peft.py).
"""

from __future__ import annotations

from phi_jax.cli import OneLineParser, bounded_int, non_empty
from phi_jax.config import DTYPES
from phi_jax.hf.convert import export_hf


def main(argv=None) -> None:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=non_empty,
                   help="a training workdir, a Hugging Face phi directory (local or gs://) or a Hub id")
    p.add_argument("--out", required=True, type=non_empty, help="the new directory, local or gs://")
    p.add_argument("--step", type=bounded_int(0, 2**63 - 1), default=None, help="default: the newest checkpoint")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--tokenizer", type=non_empty, default=None,
                   help="default: the model's own (a workdir: recorded in the checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is empty or a previous export (which lists its files in "
                        "phi_jax_export.json); a directory holding anything else is refused, never deleted")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--merge_lora", action="store_true", help="a LoRA run: merge its adapters into the base weights")
    lora.add_argument("--peft", action="store_true", help="a LoRA run: write its adapters as a PEFT adapter directory")
    args = p.parse_args(argv)
    if args.peft:
        from phi_jax.hf.peft import export_peft

        out = export_peft(args.model, args.out, step=args.step, overwrite=args.overwrite)
        print(f"exported the adapters of {args.model} -> {out} (peft.PeftModel.from_pretrained(base, {out!r}))")
        return
    out = export_hf(args.model, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
                    tokenizer=args.tokenizer, merge_lora=args.merge_lora)
    print(f"exported {args.model} -> {out}")


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
