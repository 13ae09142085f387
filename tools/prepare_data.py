"""Tokenizes a document source into train/val ArrayRecord shards for training.

    python tools/prepare_data.py --source=files --glob='~/code/**/*.py' --tokenizer=tok.model --out=data/mycode
    python tools/prepare_data.py --source=jsonl --jsonl=corpus.jsonl --tokenizer=tokenizer.json --out=data/c
    python tools/prepare_data.py --source=tfds --tfds_name=my_ds --tfds_data_dir=~/tfds --tokenizer=t.model --out=d
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _source_args import add_source_args, describe, source_documents

from phi_jax.data.shards import prepare_shards
from phi_jax.data.tokenizer import load_tokenizer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model or Hugging Face tokenizer.json")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--val_fraction", type=float, default=0.01, help="fraction of documents held out for validation")
    p.add_argument("--num_shards", type=int, default=4, help="train shard files")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    meta = prepare_shards(source_documents(a), load_tokenizer(a.tokenizer), a.out, val_fraction=a.val_fraction,
                          num_shards=a.num_shards, workers=a.workers, overwrite=a.overwrite, source=describe(a))
    for split, info in meta["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['tokens']} tokens")
    print(f"wrote {Path(a.out).absolute()}; train with --config.data.path={a.out}")


if __name__ == "__main__":
    main()
