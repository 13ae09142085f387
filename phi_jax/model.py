"""The phi-1.5 decoder in Flax NNX, read top to bottom: attention, MLP, block, model.

    h = embed(tokens)
    for each layer:  x = LayerNorm(h);  h = h + Attention(x) + MLP(x)     (one LayerNorm, parallel branches)
    logits = lm_head(final_layernorm(h))                                  (biased lm_head, float32 logits)

The layers are stacked (one set of parameters with a leading `layers` axis) and run with `jax.lax.scan`,
so compile time does not grow with depth. Decoding with a KV cache instead unrolls them over per-layer copies of
the weights (`Phi.layer_states`), so that each step reads every weight in place. Numerically identical to
Hugging Face's `PhiForCausalLM`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from phi_jax.attention import attention, cached_attention
from phi_jax.config import PhiConfig
from phi_jax.layers import Dense, LayerNorm, param
from phi_jax.rotary import apply_partial_rotary, rotary_tables
from phi_jax.sharding import constrain

Rope = tuple[jax.Array, jax.Array]  # cos, sin: [batch, seq, rotary_dim]


class KVCache(NamedTuple):
    """Keys and values of every layer for decoding. Slot s of row b is empty or padding when segment_ids[b, s] == 0.

    One array per layer (not one stacked array): each decode step then updates and reads a layer's cache in place,
    where slicing a stacked cache would copy it every step."""

    k: tuple[jax.Array, ...]  # per layer: [batch * heads, head_dim, max_len] (see attention.cached_attention)
    v: tuple[jax.Array, ...]  # per layer: [batch * heads, max_len, head_dim]
    segment_ids: jax.Array  # [batch, max_len] int32
    index: jax.Array  # int32 scalar: the next slot to write

    @classmethod
    def init(cls, cfg: PhiConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        n, h, dtype = cfg.num_heads, cfg.head_dim, dtype or cfg.compute_dtype
        zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(zeros((batch * n, h, max_len)), zeros((batch * n, max_len, h)),
                   jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def _dense(cfg: PhiConfig, rngs: nnx.Rngs, in_shape, out_shape, in_names, out_names, *, activation=None,
           impl=None) -> Dense:
    return Dense(in_shape, out_shape, in_names=in_names, out_names=out_names, activation=activation,
                 impl=impl or cfg.dense_impl, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                 init_std=cfg.initializer_range, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head causal self-attention with partial rotary on q and k."""

    def __init__(self, cfg: PhiConfig, *, rngs: nnx.Rngs):
        d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.impl = cfg.attention_impl
        # q, k and v in one [embed, 3, heads, head_dim] kernel: one matmul, heads visible to tensor parallelism.
        self.qkv = _dense(cfg, rngs, (d,), (3, n, h), ("embed",), ("qkv", "heads", "head_dim"))
        self.dense = _dense(cfg, rngs, (n, h), (d,), ("heads", "head_dim"), ("embed",))

    def __call__(self, x: jax.Array, rope: Rope, segment_ids: jax.Array | None,
                 cache: tuple[jax.Array, jax.Array, KVCache] | None = None):
        qkv = self.qkv(x)  # [B, T, 3, N, H]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_partial_rotary(q, *rope), apply_partial_rotary(k, *rope)
        q, k, v = (constrain(t, ("batch", "length", "act_heads", "head_dim")) for t in (q, k, v))
        if cache is None:
            out, new_kv = attention(q, k, v, segment_ids=segment_ids, impl=self.impl), None
        else:
            out, new_kv = _cached_attention(q, k, v, segment_ids, *cache)
        return self.dense(out), new_kv


def _cached_attention(q, k, v, segment_ids, k_cache, v_cache, cache: KVCache):
    """Writes this call's k/v into the layer's cache at cache.index (in place: the decode loop donates the cache),
    then attends over every filled slot up to each query's own."""
    start = cache.index
    b, t, n, h = k.shape
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 3, 1).reshape(b * n, h, t).astype(k_cache.dtype),
                                           (0, 0, start))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).reshape(b * n, t, h).astype(v_cache.dtype),
                                           (0, start, 0))
    q_slots = start + jnp.arange(t)
    causal = jnp.arange(cache.segment_ids.shape[1])[None, :] <= q_slots[:, None]  # [T, S]
    mask = causal[None] & (cache.segment_ids[:, None, :] == segment_ids[:, :, None])
    out = cached_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask)
    return out, (k_cache, v_cache)


class MLP(nnx.Module):
    def __init__(self, cfg: PhiConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.fc1 = _dense(cfg, rngs, (d,), (f,), ("embed",), ("mlp",), activation="gelu_new")
        self.fc2 = _dense(cfg, rngs, (f,), (d,), ("mlp",), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(constrain(self.fc1(x), ("batch", "length", "act_mlp")))


class Block(nnx.Module):
    """Parallel residual block: h + Attention(LN(h)) + MLP(LN(h)), one LayerNorm shared by both branches."""

    def __init__(self, cfg: PhiConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                                         param_dtype=cfg.params_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, h, rope, segment_ids, cache=None):
        x = self.input_layernorm(h)
        attn_out, new_kv = self.attn(x, rope, segment_ids, cache)
        h = (attn_out + self.mlp(x)) + h  # the summation order of Hugging Face's PhiDecoderLayer
        return constrain(h, ("batch", "length", "act_embed")), new_kv


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}


class Phi(nnx.Module):
    """phi-1 / phi-1.5 causal language model: `model(input_ids)` -> float32 logits [batch, seq, vocab]."""

    def __init__(self, cfg: PhiConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = param(rngs, nnx.initializers.normal(cfg.initializer_range),
                                  (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.params_dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.layers = make_blocks(rngs)
        self.final_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                                         param_dtype=cfg.params_dtype, rngs=rngs)
        self.lm_head = _dense(cfg, rngs, (cfg.hidden_size,), (cfg.vocab_size,), ("embed",), ("vocab",), impl="xla")

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """input_ids, positions, segment_ids: int [batch, seq]. Packed rows: positions restart per document and
        segment ids keep attention within it. Returns float32 logits [batch, seq, vocab]."""
        logits, _ = self._forward(input_ids, positions, segment_ids, None)
        return logits

    def decode(self, input_ids: jax.Array, cache: KVCache, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               layers: list[nnx.State] | None = None) -> tuple[jax.Array, KVCache]:
        """Runs `input_ids` [batch, T] at cache slots [index, index + T) (prefill: T > 1; a decode step: T = 1).

        `layers`: `self.layer_states()`, made once outside the jitted decode loop. Without it, each call slices
        the stacked layer parameters, which on XLA:CPU copies every weight."""
        return self._forward(input_ids, positions, segment_ids, cache,
                             self.layer_states() if layers is None else layers)

    def layer_states(self) -> list[nnx.State]:
        """Each layer's parameters as arrays of their own (a copy of the stacked ones), for decoding.

        A decode step reads every weight once. Through the stacked parameters (a scan, or a slice per layer)
        XLA:CPU first copies each layer's slice, which more than doubled the time of a phi-100m decode step."""
        stacked = nnx.state(self.layers)
        return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(self.cfg.num_layers)]

    def _forward(self, input_ids, positions, segment_ids, cache: KVCache | None, layers=None):
        cfg = self.cfg
        batch, seq = input_ids.shape
        offset = 0 if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        if cache is not None:
            segment_ids = jnp.ones((batch, seq), jnp.int32) if segment_ids is None else segment_ids
            cache = cache._replace(segment_ids=jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids,
                                                                            (0, cache.index)))
        rope = rotary_tables(positions, cfg.rotary_dim, cfg.rope_theta)

        # Gather the (vocab/FSDP-sharded) table whole in the compute dtype before the lookup: a gather from a
        # sharded table makes the SPMD partitioner replicate it implicitly, and less efficiently.
        table = constrain(self.embed_tokens[...].astype(cfg.compute_dtype), (None, None))
        h = jnp.take(table, input_ids, axis=0)
        h = constrain(h, ("batch", "length", "act_embed"))

        graphdef, layer_state = nnx.split(self.layers)

        if cache is None:
            def layer(h, state):
                return nnx.merge(graphdef, state)(h, rope, segment_ids)[0], None

            if cfg.remat != "none":
                layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
            h, _ = jax.lax.scan(layer, h, layer_state)
        else:
            # Decoding unrolls the layers: each reads its own weights and its own cache, both in place.
            k_out, v_out = [], []
            for i, state in enumerate(layers):
                h, (k, v) = nnx.merge(graphdef, state)(h, rope, segment_ids, (cache.k[i], cache.v[i], cache))
                k_out.append(k)
                v_out.append(v)

        logits = self.lm_head(self.final_layernorm(h), out_dtype=jnp.float32)
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        if cache is not None:
            cache = cache._replace(k=tuple(k_out), v=tuple(v_out), index=cache.index + seq)
        return logits, cache


def init_model(cfg: PhiConfig, seed: int = 0) -> Phi:
    return Phi(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: PhiConfig) -> Phi:
    """The model's structure and shapes without allocating any parameter (for full-size checks and restores)."""
    return nnx.eval_shape(lambda: Phi(cfg, rngs=nnx.Rngs(params=0)))


def count_params(model: Phi) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
