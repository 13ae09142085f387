"""From run config to checked data: which shards, which tokenizer, and whether they fit the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from phi_jax.data.default import ensure_default_dataset
from phi_jax.data.shards import check_compatible, read_metadata
from phi_jax.data.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class DataSpec:
    path: Path  # shard directory
    tokenizer: Tokenizer
    meta: dict  # the shards' metadata.json

    def identity(self) -> dict:
        """What a checkpoint records about its data."""
        splits = self.meta["splits"]
        return {"path": str(self.path), "tokenizer": self.tokenizer.identity(),
                "tokenizer_path": str(Path(self.tokenizer.path).absolute()), "source": self.meta.get("source", ""),
                "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
                "train_documents": splits["train"]["documents"], "val_documents": splits["val"]["documents"]}

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Every token id of the tokenizer and of the shards must have a row in the model's embedding."""
        vocab, max_id = self.tokenizer.vocab_size, self.meta["max_token_id"]
        if vocab > model_vocab_size or max_id >= model_vocab_size:
            raise ValueError(f"The tokenizer has vocab_size {vocab} (largest token id in the shards: {max_id}) but "
                             f"the model embeds only {model_vocab_size} ids: use a model with vocab_size >= {vocab} "
                             "or a smaller tokenizer (--config.data.default_vocab_size / tools/train_tokenizer.py).")


def resolve_data(c) -> DataSpec:
    """The shards of `c.data.path` ("" = the embedded stdlib corpus, built on first use) and their tokenizer."""
    if c.data.path:
        path = Path(c.data.path).expanduser().absolute()
    else:
        path, _ = ensure_default_dataset(c.data.cache_dir or None, c.data.default_vocab_size)
    meta = read_metadata(path)
    if c.data.tokenizer:
        tokenizer = load_tokenizer(Path(c.data.tokenizer).expanduser())
    else:
        tokenizer = load_tokenizer(path / meta["tokenizer_file"])
    check_compatible(meta, tokenizer)
    train_tokens = meta["splits"]["train"]["tokens"]
    if train_tokens <= c.seq_len:
        raise ValueError(f"The train split of {path} has {train_tokens} tokens, too few for one window of "
                         f"seq_len={c.seq_len}: use a smaller --config.seq_len or more data.")
    return DataSpec(path=path, tokenizer=tokenizer, meta=meta)
