"""A run's training data, resolved from its run config: the shards (the embedded corpus, one directory or a weighted
mixture), their tokenizer and whether both fit the model; then the train pipeline, the validation batches, the
per-source metrics and the identity a checkpoint records."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from phi_jax.data.default import default_cache_dir, ensure_default_dataset
from phi_jax.data.loader import make_dataset, make_eval_batches, make_mixture_dataset
from phi_jax.data.mixture import Interleave, integer_proportions, parse_paths, parse_weights, source_names
from phi_jax.data.shards import check_compatible, read_metadata, verify_checksums
from phi_jax.data.tokenizer import Tokenizer, load_tokenizer
from phi_jax.paths import user_path


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """A run's data, resolved and checked by `resolve_data`."""

    paths: tuple  # shard directories (epath: local or gs://); more than one = a mixture
    tokenizer: Tokenizer
    metas: tuple[dict, ...]  # each directory's metadata.json
    weights: tuple[float, ...] = (1.0,)
    tokenizer_source: str = ""  # where the tokenizer was read from (a gs:// file is loaded from a local copy)

    @property
    def path(self):
        return self.paths[0]

    @property
    def meta(self) -> dict:
        return self.metas[0]

    @property
    def is_mixture(self) -> bool:
        return len(self.paths) > 1

    @property
    def names(self) -> list[str]:
        return source_names(list(self.paths))

    def identity(self) -> dict:
        """What a checkpoint records about its data."""
        splits = self.meta["splits"]
        tokenizer_path = self.tokenizer_source or str(Path(self.tokenizer.path).absolute())
        ident = {"path": str(self.path), "tokenizer": self.tokenizer.identity(), "shards": self.shards_digest(),
                 "tokenizer_path": tokenizer_path, "source": self.meta.get("source", ""),
                 "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
                 "train_documents": splits["train"]["documents"], "val_documents": splits["val"]["documents"]}
        if self.is_mixture:
            ident["mixture"] = [{"path": str(p), "weight": w, "source": m.get("source", ""),
                                 "train_tokens": m["splits"]["train"]["tokens"]}
                                for p, w, m in zip(self.paths, self.weights, self.metas, strict=True)]
        return ident

    def shards_digest(self) -> str:
        """One sha256 over every source's recorded files (name, size, sha256): shards replaced under the same path
        change it, so a restart on them is refused like a changed path."""
        h = hashlib.sha256()
        for meta in self.metas:
            for split in sorted(meta["splits"]):
                info = meta["splits"][split]
                for record in [*info["shards"], info["lengths"]]:
                    h.update(f"{split}/{record['file']}:{record['bytes']}:{record['sha256']}\n".encode())
        return h.hexdigest()

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Every token id of the tokenizer and of the shards must have a row in the model's embedding."""
        vocab, max_id = self.tokenizer.vocab_size, max(m["max_token_id"] for m in self.metas)
        if vocab > model_vocab_size or max_id >= model_vocab_size:
            raise ValueError(f"The tokenizer has vocab_size {vocab} (largest token id in the shards: {max_id}) but "
                             f"the model embeds only {model_vocab_size} ids: use a model with vocab_size >= {vocab} "
                             "or a smaller tokenizer (--config.data.default_vocab_size, or python -m "
                             "tools.train_tokenizer).")

    def train_dataset(self, c, process_index: int = 0, process_count: int = 1, start_batch: int = 0):
        """This process's training batches from global batch `start_batch` (= the step resumed; see loader.py)."""
        kw = dict(seq_len=c.seq_len, global_batch_size=c.batch_size, seed=c.seed, process_index=process_index,
                  process_count=process_count, packing=c.data.packing, start_batch=start_batch)
        if self.is_mixture:
            return make_mixture_dataset(list(self.paths), list(self.weights), split="train", **kw)
        return make_dataset(self.path, split="train", **kw)

    def eval_batches(self, seq_len: int, batch_size: int, max_batches: int) -> dict[str, list]:
        """Validation batches of each source, by metric name ("" for a single directory)."""
        names = self.names if self.is_mixture else [""]
        return {n: make_eval_batches(p, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
                for n, p in zip(names, self.paths, strict=True)}

    def val_metrics(self, losses: dict[str, float]) -> dict[str, float]:
        """{name: loss} -> val_loss (the mixture's weighted mean) and val_loss/<source> for each source."""
        if not self.is_mixture:
            return {"val_loss": losses[""]}
        total = sum(self.weights)
        out = {"val_loss": sum(w / total * losses[n] for n, w in zip(self.names, self.weights, strict=True))}
        return out | {f"val_loss/{n}": v for n, v in losses.items()}

    def tokens_seen(self, examples: int, seq_len: int) -> dict[str, int]:
        """Tokens each source has supplied after `examples` global examples (token slots, padding included)."""
        if not self.is_mixture:
            return {}
        counts = Interleave(integer_proportions(list(self.weights))).counts(examples)
        return {f"tokens/{n}": k * seq_len for n, k in zip(self.names, counts, strict=True)}


def resolve_data(c) -> TrainingData:
    """The shards of `c.data.path` ("" = the embedded stdlib corpus, built on first use; "a,b" with
    `c.data.mixture_weights` = a weighted mixture) and the one tokenizer they all share."""
    weights = parse_weights(c.data.mixture_weights) if c.data.mixture_weights else []
    if c.data.path:
        paths = parse_paths(c.data.path)
    elif weights:
        raise ValueError(f"mixture_weights={c.data.mixture_weights!r} mixes {len(weights)} sources: give their "
                         "shard directories in the same order, --config.data.path=DIR1,DIR2,...")
    else:
        paths = [ensure_default_dataset(c.data.cache_dir or None, c.data.default_vocab_size)[0]]
    if len(paths) > 1 and not weights:
        raise ValueError(f"--config.data.path names {len(paths)} directories: give their shares with "
                         "--config.data.mixture_weights=W1,W2,... (one per directory).")
    if weights and len(weights) != len(paths):
        raise ValueError(f"--config.data.path names {len(paths)} directories but mixture_weights="
                         f"{c.data.mixture_weights!r} gives {len(weights)} weights: give one weight per directory.")
    metas = [read_metadata(p) for p in paths]
    for p, m in zip(paths[1:], metas[1:], strict=True):
        if m["tokenizer"]["sha256"] != metas[0]["tokenizer"]["sha256"]:
            raise ValueError(f"The mixture's sources were made with different tokenizers: {paths[0]} with "
                             f"{metas[0]['tokenizer']['path']} (sha256 {metas[0]['tokenizer']['sha256'][:12]}), {p} "
                             f"with {m['tokenizer']['path']} (sha256 {m['tokenizer']['sha256'][:12]}). Prepare every "
                             "source with the same tokenizer (python -m tools.prepare_data --tokenizer).")
    if c.data.verify_checksums:  # sizes are checked at every open; this reads every byte once per host
        for p, m in zip(paths, metas, strict=True):
            verify_checksums(p, m, cache_dir=c.data.cache_dir or default_cache_dir())
    source = user_path(c.data.tokenizer) if c.data.tokenizer else paths[0] / metas[0]["tokenizer_file"]
    tokenizer = load_tokenizer(source)
    check_compatible(metas[0], tokenizer)
    for p, m in zip(paths, metas, strict=True):
        train_tokens = m["splits"]["train"]["tokens"]
        if train_tokens <= c.seq_len:
            raise ValueError(f"The train split of {p} has {train_tokens} tokens, too few for one window of "
                             f"seq_len={c.seq_len}: use a smaller --config.seq_len or more data.")
    if c.eval_every > 0 and c.eval_batches > 0:
        for p, m in zip(paths, metas, strict=True):
            if m["splits"].get("val", {}).get("documents", 0) == 0:
                raise ValueError(f"{p} has no validation split (prepared with --val_fraction=0) but validation is on "
                                 f"(--config.eval_every={c.eval_every}): set --config.eval_every=0, or prepare the "
                                 "shards again with --val_fraction > 0.")
    return TrainingData(paths=tuple(paths), tokenizer=tokenizer, metas=tuple(metas),
                    weights=tuple(weights) if weights else (1.0,), tokenizer_source=str(source))

