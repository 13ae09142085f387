"""The phi-1.5 decoder in Flax NNX, read top to bottom: attention, MLP, block, model.

    h = embed(tokens)
    for each layer:  x = LayerNorm(h);  h = h + Attention(x) + MLP(x)     (one LayerNorm, parallel branches)
    logits = lm_head(final_layernorm(h))                                  (biased lm_head, float32 logits)

`Phi(tokens, positions, cache=None, segment_ids=None) -> (logits, cache)` is the one entry point, as in gemma:
without a cache it runs whole sequences (training, scoring; packed documents keep to their segment id), with one it
writes the tokens into the cache at its index and attends over every filled slot (prefill and decode steps).

The layers are stored stacked (one set of parameters with a leading `layers` axis, what training scans over,
what checkpoints and Hugging Face conversion read) until `unstack_layers()` moves them, in place, into one Block
per layer, which a decode step reads without a copy. On XLA:CPU, reading the stacked weights per layer (a scan,
or a static slice per layer) copies every layer's weights on every token (docs/PERFORMANCE.md, Generation), so the
`Sampler` (phi_jax/generate.py) unstacks the model it is given: a move, not a second copy. Numerically identical
to Hugging Face's `PhiForCausalLM`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from phi_jax.attention import attention, cached_attention, causal_segment_mask
from phi_jax.config import Compute, PhiConfig
from phi_jax.layers import Dense, LayerNorm, param
from phi_jax.rotary import apply_partial_rotary, rotary_tables
from phi_jax.sharding import constrain

Rope = tuple[jax.Array, jax.Array]  # cos, sin: [batch, seq, rotary_dim]


class LayerCache(NamedTuple):
    """One attention layer's keys and values, each [batch * heads, max_len, head_dim]: [B, N, S, H] with batch and
    heads merged (the same bytes). With a unit batch dimension, XLA:CPU copied a [1, N, S, H] cache on every
    decode step (the compiled step's temporaries held the whole cache); the merged one is updated in place."""

    k: jax.Array
    v: jax.Array


class Cache(NamedTuple):
    """The decoding state: each layer's keys and values, the segment id of every slot (0: empty or padding; a query
    attends only to slots of its own segment) and the next slot to write: one for every row (a scalar, as the
    Sampler's left-padded batch fills its rows together), or one per row ([batch], as a serving engine's rows hold
    requests of different lengths: phi_jax/engine.py)."""

    layers: tuple[LayerCache, ...]
    segment_ids: jax.Array  # [batch, max_len] int32
    index: jax.Array  # int32 scalar, or [batch]


def write_slots(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """`new` [R, T, ...] written into `cache` [R, S, ...] at slots [index, index + T) of every row: `index` is a
    scalar (one in-place slice update) or one per row [R] (a scatter, also in place when the cache is donated)."""
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, index) + (0,) * (cache.ndim - 2))
    row = lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (i,) + (0,) * (c.ndim - 1))
    return jax.vmap(row)(cache, new, index)


def _dense(cfg: PhiConfig, compute: Compute, rngs: nnx.Rngs, in_shape, out_shape, in_names, out_names, *,
           activation=None, impl=None) -> Dense:
    return Dense(in_shape, out_shape, in_names=in_names, out_names=out_names, activation=activation,
                 impl=impl or compute.dense_impl, dtype=compute.dtype, param_dtype=compute.param_dtype,
                 init_std=cfg.initializer_range, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head causal self-attention with partial rotary on q and k; owns the layout of its KV cache."""

    def __init__(self, cfg: PhiConfig, compute: Compute, *, rngs: nnx.Rngs):
        d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.impl, self.num_heads, self.head_dim = compute.attention_impl, n, h
        # q, k and v in one [embed, 3, heads, head_dim] kernel: one matmul, heads visible to tensor parallelism.
        self.qkv = _dense(cfg, compute, rngs, (d,), (3, n, h), ("embed",), ("qkv", "heads", "head_dim"))
        self.dense = _dense(cfg, compute, rngs, (n, h), (d,), ("heads", "head_dim"), ("embed",))

    def init_cache(self, batch: int, max_len: int, dtype) -> LayerCache:
        shape = (batch * self.num_heads, max_len, self.head_dim)
        return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def __call__(self, x: jax.Array, rope: Rope, segment_ids: jax.Array | None, cache: LayerCache | None = None,
                 *, index: jax.Array | None = None, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, LayerCache | None]:
        """x: [B, T, D]. Without a cache: causal attention within `segment_ids` [B, T] (the kernels take the ids,
        not a mask). With one: k and v go into slots [index, index + T) (index: a scalar or one per row [B]) and
        the queries attend where `mask` [B, T, S] allows. Returns ([B, T, D], the updated cache)."""
        qkv = self.qkv(x)  # [B, T, 3, N, H]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_partial_rotary(q, *rope), apply_partial_rotary(k, *rope)
        q, k, v = (constrain(t, ("batch", "length", "act_heads", "head_dim")) for t in (q, k, v))
        if cache is None:
            return self.dense(attention(q, k, v, segment_ids=segment_ids, impl=self.impl)), None
        b, t, n, h = k.shape
        rows = index if index.ndim == 0 else jnp.repeat(index, n)  # the cache's rows are (batch, head) pairs
        write = lambda c, new: write_slots(  # in place: the Sampler and the engine donate the cache
            c, new.transpose(0, 2, 1, 3).reshape(b * n, t, h).astype(c.dtype), rows)
        cache = LayerCache(write(cache.k, k), write(cache.v, v))
        out = cached_attention(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask)
        return self.dense(out), cache


class MLP(nnx.Module):
    def __init__(self, cfg: PhiConfig, compute: Compute, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.fc1 = _dense(cfg, compute, rngs, (d,), (f,), ("embed",), ("mlp",), activation="gelu_new")
        self.fc2 = _dense(cfg, compute, rngs, (f,), (d,), ("mlp",), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(constrain(self.fc1(x), ("batch", "length", "act_mlp")))


class Block(nnx.Module):
    """Parallel residual block: h + Attention(LN(h)) + MLP(LN(h)), one LayerNorm shared by both branches."""

    def __init__(self, cfg: PhiConfig, compute: Compute, *, rngs: nnx.Rngs):
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=compute.dtype,
                                         param_dtype=compute.param_dtype, rngs=rngs)
        self.attn = Attention(cfg, compute, rngs=rngs)
        self.mlp = MLP(cfg, compute, rngs=rngs)

    def __call__(self, h, rope, segment_ids, cache=None, **cache_args):
        x = self.input_layernorm(h)
        attn_out, cache = self.attn(x, rope, segment_ids, cache, **cache_args)
        h = (attn_out + self.mlp(x)) + h  # the summation order of Hugging Face's PhiDecoderLayer
        return constrain(h, ("batch", "length", "act_embed")), cache


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}


class Phi(nnx.Module):
    """phi-1 / phi-1.5 causal language model: `model(tokens)` -> (float32 logits [batch, seq, vocab], cache).

    `cfg` is the architecture, `compute` how it runs (dtypes, kernels, remat); the model keeps both."""

    def __init__(self, cfg: PhiConfig, compute: Compute = Compute(), *, rngs: nnx.Rngs):
        self.cfg, self.compute = cfg, compute
        self.embed_tokens = param(rngs, nnx.initializers.normal(cfg.initializer_range),
                                  (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), compute.param_dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, compute, rngs=rngs)

        self.layers: Block | nnx.List[Block] = make_blocks(rngs)  # stacked until unstack_layers()
        self.final_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=compute.dtype,
                                         param_dtype=compute.param_dtype, rngs=rngs)
        self.lm_head = _dense(cfg, compute, rngs, (cfg.hidden_size,), (cfg.vocab_size,), ("embed",), ("vocab",),
                              impl="xla")

    @property
    def stacked(self) -> bool:
        return isinstance(self.layers, Block)

    def unstack_layers(self) -> None:
        """Moves the stacked layer parameters into one Block per layer, in place (for decoding; see the module
        docstring). Each stacked array is released once split, so the model keeps one copy of its weights (while
        this runs, at most one stacked parameter's worth more). Full sequences then run the layers unrolled."""
        if not self.stacked:
            return
        n, graphdef = self.cfg.num_layers, nnx.graphdef(self.layers)
        pieces = []
        for path, var in nnx.iter_graph(self.layers):
            if isinstance(var, nnx.Variable):
                stacked = var.get_value()
                names = var.get_metadata().get("out_sharding")
                extra = {"out_sharding": names[1:]} if names else {}  # drop the "layers" axis name
                pieces.append((path, [var.replace(stacked[i], **extra) for i in range(n)]))
                var.set_value(jnp.zeros((), stacked.dtype))  # release the stacked array now, not at the end
                del stacked
        self.layers = nnx.List([nnx.merge(graphdef, nnx.from_flat_state([(p, v[i]) for p, v in pieces]))
                                for i in range(n)])

    def stack_layers(self) -> None:
        """The inverse of `unstack_layers` (training, checkpoints and Hugging Face export read stacked layers)."""
        if self.stacked:
            return
        graphdef = nnx.graphdef(self.layers[0])
        states = [nnx.state(block) for block in self.layers]

        def stack(*vs):
            names = vs[0].get_metadata().get("out_sharding")
            extra = {"out_sharding": ("layers", *names)} if names else {}
            return vs[0].replace(jnp.stack([v.get_value() for v in vs]), **extra)

        stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.layers = nnx.merge(graphdef, stacked)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        """An empty cache of `max_len` slots per row (dtype: the compute dtype by default)."""
        dtype = self.compute.dtype if dtype is None else dtype
        blocks = self.layers if not self.stacked else [self.layers] * self.cfg.num_layers
        return Cache(tuple(b.attn.init_cache(batch, max_len, dtype) for b in blocks),
                     jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: Cache | None = None, *,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """tokens, positions, segment_ids: int [batch, seq]; positions default to 0, 1, ... from the cache index.

        Packed rows: positions restart per document and segment ids keep attention within it. With a cache, the
        tokens fill slots [index, index + seq) and segment id 0 marks padding (left-padded prompts). Returns float32
        logits [batch, seq, vocab] and the updated cache (None without one)."""
        cfg = self.cfg
        batch, seq = tokens.shape
        start = 0 if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(jnp.expand_dims(start, -1) + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        rope = rotary_tables(positions, cfg.rotary_dim, cfg.rope_theta)

        # Gather the (vocab/FSDP-sharded) table whole in the compute dtype before the lookup: a gather from a
        # sharded table makes the SPMD partitioner replicate it implicitly, and less efficiently.
        table = constrain(self.embed_tokens[...].astype(self.compute.dtype), (None, None))
        h = constrain(jnp.take(table, tokens, axis=0), ("batch", "length", "act_embed"))

        if cache is not None:
            h, cache = self._decode_layers(h, rope, segment_ids, cache)
        elif self.stacked:
            h = self._scan_layers(h, rope, segment_ids)
        else:
            for block in self.layers:
                h, _ = block(h, rope, segment_ids)

        logits = self.lm_head(self.final_layernorm(h), out_dtype=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab")), cache

    def _scan_layers(self, h, rope, segment_ids):
        """Training's path: one scan over the stacked layers, so compile time does not grow with depth."""
        graphdef, state = nnx.split(self.layers)

        def layer(h, state):
            return nnx.merge(graphdef, state)(h, rope, segment_ids)[0], None

        if self.compute.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[self.compute.remat], prevent_cse=False)
        return jax.lax.scan(layer, h, state)[0]

    def _decode_layers(self, h, rope, segment_ids, cache: Cache):
        """Writes the tokens' slots into the cache and runs the layers unrolled, each on its own cache."""
        batch, seq = h.shape[:2]
        segment_ids = jnp.ones((batch, seq), jnp.int32) if segment_ids is None else segment_ids
        slots = write_slots(cache.segment_ids, segment_ids, cache.index)
        q_start = cache.index if cache.index.ndim == 0 else cache.index[:, None, None]  # per row: [B, 1, 1]
        mask = causal_segment_mask(segment_ids, seq, kv_segment_ids=slots, q_start=q_start)  # built once
        if self.stacked:  # correct, but on XLA:CPU each slice copies a layer's weights: decode unstacked
            graphdef, state = nnx.split(self.layers)
            blocks = [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(self.cfg.num_layers)]
        else:
            blocks = self.layers
        layers = []
        for block, layer_cache in zip(blocks, cache.layers, strict=True):
            h, layer_cache = block(h, rope, segment_ids, layer_cache, index=cache.index, mask=mask)
            layers.append(layer_cache)
        return h, Cache(tuple(layers), slots, cache.index + seq)


def init_model(cfg: PhiConfig, seed: int = 0, compute: Compute = Compute()) -> Phi:
    return Phi(cfg, compute, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: PhiConfig, compute: Compute = Compute()) -> Phi:
    """The model's structure and shapes without allocating any parameter (for full-size checks and restores)."""
    return nnx.eval_shape(lambda: Phi(cfg, compute, rngs=nnx.Rngs(params=0)))


def count_params(model: Phi) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
