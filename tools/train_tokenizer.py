"""Trains a code-exact SentencePiece BPE tokenizer on a document source.

    python -m tools.train_tokenizer --source=files --glob='~/code/**/*.py' --vocab_size=16384 --out=tok/code
    (writes tok/code.model)
"""

import argparse
import time

from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from tools._source_args import add_source_args, source_documents


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--out", required=True, help="model prefix: writes OUT.model")
    p.add_argument("--max_chars", type=int, default=20_000_000, help="train on at most this many characters")
    p.add_argument("--input_sentence_size", type=int, default=200_000, help="cap on training chunks (sampled)")
    a = p.parse_args(argv)
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
