"""Data: tokenizers, document sources, token shards on disk and the grain input pipeline."""
