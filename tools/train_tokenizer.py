"""Trains a code-exact SentencePiece BPE tokenizer on a document source.

    python -m tools.train_tokenizer --source=files --glob='~/code/**/*.py' --vocab_size=16384 --out=tok/code
    (writes tok/code.model; an existing one is replaced only with --overwrite)
"""

import argparse
import time
from pathlib import Path

from phi_jax.data.tokenizer import MIN_VOCAB_SIZE, load_tokenizer, train_sentencepiece
from tools._source_args import (
    OneLineParser,
    add_source_args,
    bounded_int,
    check_source_args,
    positive_int,
    source_documents,
)


def main(argv=None) -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--vocab_size", type=bounded_int(MIN_VOCAB_SIZE, 2**31 - 1), default=8192,
                   help=f"pieces in the model, >= {MIN_VOCAB_SIZE} (and one per distinct character of the text)")
    p.add_argument("--out", required=True, help="model prefix: writes OUT.model")
    p.add_argument("--max_chars", type=positive_int, default=20_000_000,
                   help="train on at most this many characters")
    p.add_argument("--input_sentence_size", type=positive_int, default=200_000,
                   help="cap on training chunks (sampled)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.model")
    a = p.parse_args(argv)
    check_source_args(a)
    if not a.out.strip():
        raise ValueError("--out is empty: give a model prefix, e.g. --out=tok/code (writes tok/code.model).")
    out = Path(f"{a.out}.model")
    if out.is_dir():
        raise FileExistsError(f"{out} is a directory; choose another --out.")
    if out.exists() and not a.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out.")
    texts, total = [], 0
    for doc in source_documents(a):
        texts.append(doc)
        total += len(doc)
        if total >= a.max_chars:
            break
    start = time.perf_counter()
    path = train_sentencepiece(texts, a.out, a.vocab_size, input_sentence_size=a.input_sentence_size)
    tok = load_tokenizer(path)
    bad = sum(tok.decode(tok.encode(t)) != t for t in texts[:200])
    print(f"wrote {path}: vocab {tok.vocab_size}, eos {tok.eos_id}, trained on {total / 1e6:.1f} MB in "
          f"{time.perf_counter() - start:.1f} s; round trip exact on {min(200, len(texts)) - bad}/"
          f"{min(200, len(texts))} documents")


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
