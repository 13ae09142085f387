"""Document embeddings from a phi_jax model: final-layernormed hidden states, mean-pooled over the real tokens.

phi-1's classifier read "output embeddings" of a pretrained code model (Gunasekar et al. 2023, section 2.1); here any
model phi_jax loads (a training workdir, a Hugging Face phi directory, a Hub id) does. Documents are tokenized,
cut to `max_tokens`, sorted by length within a batch group, padded at the end to a power-of-two length (few
compiles) and run through one jitted function: padding never changes a real token's state (causal attention looks
only back), and the mean covers positions < length. On several devices the batch is split over a data mesh and the
parameters are placed like training's (`sharding`: "dp" replicates them, "fsdp" shards them), through the model's
own logical axis names.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from phi_jax.config import Compute
from phi_jax.loading import load
from phi_jax.sharding import activation_sharding, batch_sharding, logical_to_spec, make_mesh, strategy_rules

MIN_BUCKET = 16


@functools.partial(jax.jit, static_argnums=0)
def _mean_pooled(graphdef, state, tokens, lengths):
    """[B, L] tokens, [B] lengths -> [B, D] float32 means of the hidden states at positions < length."""
    h = nnx.merge(graphdef, state).hidden_states(tokens).astype(jnp.float32)  # [B, L, D]
    mask = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)  # [B, L]
    return jnp.einsum("BLD,BL->BD", h, mask) / jnp.maximum(lengths, 1)[:, None].astype(jnp.float32)


def bucket_length(n: int, max_tokens: int) -> int:
    return min(max_tokens, max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


class Embedder:
    """`embed(texts) -> [n, hidden]` float32, batch by batch on the model's devices."""

    def __init__(self, model: str, *, tokenizer: str | None = None, max_tokens: int = 512, batch_size: int = 32,
                 dtype: str = "float32", devices=None, sharding: str = "dp"):
        if max_tokens < 1 or batch_size < 1:
            raise ValueError(f"--max_tokens={max_tokens} and --batch_size={batch_size} must be >= 1.")
        self.model_name, self.max_tokens, self.dtype, self.sharding = str(model), max_tokens, dtype, sharding
        phi, self.tokenizer = load(model, compute=Compute(dtype=dtype, param_dtype=dtype), tokenizer=tokenizer)
        if max_tokens > phi.cfg.max_position_embeddings:
            raise ValueError(f"--max_tokens={max_tokens} exceeds the model's context of "
                             f"{phi.cfg.max_position_embeddings}.")
        self.hidden_size = phi.cfg.hidden_size
        devices = jax.local_devices() if devices is None else devices  # each host embeds its own documents
        self.mesh = make_mesh(data=-1, devices=devices) if sharding == "dp" else \
            make_mesh(data=1, fsdp=-1, devices=devices)
        self.rules = strategy_rules(sharding)[0]
        ways = len(devices)
        self.batch_size = math.ceil(batch_size / ways) * ways  # a whole number of rows per device
        self.graphdef, state = nnx.split(phi)

        def place(v):
            names = v.get_metadata().get("out_sharding")
            value = v.get_value()
            spec = logical_to_spec(names, self.rules) if names and len(names) == value.ndim else PartitionSpec()
            return v.replace(jax.device_put(value, NamedSharding(self.mesh, spec)))

        self.state = jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.batch_sh = batch_sharding(self.mesh)
        self.lengths_sh = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))

    def describe(self) -> dict:
        """What the features depend on: a classifier must be applied to features made the same way."""
        return {"model": self.model_name, "tokenizer": self.tokenizer.identity(), "max_tokens": self.max_tokens,
                "dtype": self.dtype, "pooling": "mean of final-layernormed hidden states over real tokens",
                "hidden_size": self.hidden_size}

    def _tokens(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)[:self.max_tokens]
        return ids or [self.tokenizer.eos_id]  # an empty document is one end-of-text token

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), hidden] float32, in the order of `texts`."""
        encoded = [self._tokens(t) for t in texts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = np.zeros((len(texts), self.hidden_size), np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            length = bucket_length(max(len(encoded[i]) for i in rows), self.max_tokens)
            tokens = np.zeros((self.batch_size, length), np.int32)
            lengths = np.zeros((self.batch_size,), np.int32)
            for r, i in enumerate(rows):
                tokens[r, :len(encoded[i])] = encoded[i]
                lengths[r] = len(encoded[i])
            with activation_sharding(self.mesh, self.rules):
                pooled = _mean_pooled(self.graphdef, self.state, jax.device_put(tokens, self.batch_sh),
                                      jax.device_put(lengths, self.lengths_sh))
            out[rows] = np.asarray(pooled)[:len(rows)]
        return out
