"""Shared pieces of the data-generation tests: a tiny phi model with a SentencePiece tokenizer saved as a Hugging
Face directory (what tools.quality_filter embeds with), and a corpus whose quality labels are learnable."""

from __future__ import annotations

import json
import random
from pathlib import Path

from runs import documents


def tiny_model_dir(root: Path) -> Path:
    """A random `tiny` phi model (vocab 512) and a 512-piece SentencePiece model of stdlib code, in one directory."""
    from phi_jax.config import PhiConfig
    from phi_jax.data.tokenizer import train_sentencepiece
    from phi_jax.hf.io import save_pretrained
    from phi_jax.model import init_model

    sp = train_sentencepiece(documents(20), root / "sp512", vocab_size=512)
    return save_pretrained(init_model(PhiConfig.preset("tiny"), 0), root / "model",
                           extra_files={"tokenizer.model": Path(str(sp)).read_bytes()})


PROSE = ("the", "cat", "sat", "on", "a", "mat", "and", "then", "slept", "in", "sun", "all", "day", "long")


def labelled_corpus(n: int, seed: int = 0) -> list[dict]:
    """Half Python functions (label 1), half word salad (label 0), interleaved: a learnable quality label."""
    rng = random.Random(seed)
    name = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
    out = []
    for i in range(n):
        if i % 2 == 0:
            text = "\n".join(f"def {name()}({(a := name())}):\n    return {a} * {rng.randint(2, 99)}"
                             for _ in range(rng.randint(2, 8)))
        else:
            text = " ".join(rng.choice(PROSE) for _ in range(rng.randint(20, 90)))
        out.append({"id": f"doc{i}", "text": text, "label": int(i % 2 == 0)})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
