"""The phi-1.5 decoder in Flax NNX, read top to bottom: attention, MLP, block, model.

    h = embed(tokens)
    for each layer:  x = LayerNorm(h);  h = h + Attention(x) + MLP(x)     (one LayerNorm, parallel branches)
    logits = lm_head(final_layernorm(h))                                  (biased lm_head, float32 logits)

`Phi(tokens, positions, cache=None, segment_ids=None) -> (logits, cache)` is the one entry point, as in gemma:
without a cache it runs whole sequences (training, scoring; packed documents keep to their segment id), with one it
writes the tokens into the cache at its index and attends over every filled slot (prefill and decode steps).
`Phi.hidden_states` is the same forward pass up to the final LayerNorm (what lm_head reads).

The layer layout is chosen when a model is made and never changes: `scan_layers=True` (the default) stores one set
of parameters with a leading `layers` axis, which training scans over (compile time does not grow with depth) and
which checkpoints and Hugging Face conversion name; `scan_layers=False` stores one Block per layer, which a decode
step reads without a copy. Both layouts run every path and give the same logits. On XLA:CPU, decoding reads a
stacked layer's weights through a slice that copies them on every token, so there the unrolled layout is the fast
one for decoding (docs/PERFORMANCE.md, Generation); `phi_jax.from_pretrained(..., scan_layers=False)` loads
straight into it, and `to_layout` returns a model's parameters in the other layout as a new model. Numerically
identical to Hugging Face's `PhiForCausalLM`.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from phi_jax.attention import attention, cached_attention, causal_segment_mask
from phi_jax.config import REMAT_POLICIES, Compute, PhiConfig
from phi_jax.dispatch import default_platform
from phi_jax.layers import Dense, LayerNorm, param
from phi_jax.lora import Adapters, LoraConfig, dropout_scope, layer_dropout_keys
from phi_jax.rotary import apply_partial_rotary, rotary_tables
from phi_jax.sharding import constrain

Rope = tuple[jax.Array, jax.Array]  # cos, sin: [batch, seq, rotary_dim]


class LayerCache(NamedTuple):
    """One attention layer's keys and values, each [batch * heads, max_len, head_dim]: [B, N, S, H] with batch and
    heads merged (the same bytes). XLA:CPU copies a [1, N, S, H] cache (a unit batch dimension) on every decode
    step, its temporaries holding the whole cache; the merged one is updated in place."""

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
           activation=None, impl=None, lora: Adapters | None = None, target: str = "") -> Dense:
    """A Dense of the model; `lora` adds an adapter when `target` is one of its targets (phi_jax/lora.py)."""
    adapter = lora.config if lora is not None and target in lora.config.targets else None
    return Dense(in_shape, out_shape, in_names=in_names, out_names=out_names, activation=activation,
                 impl=impl or compute.dense_impl, platform=compute.platform, dtype=compute.dtype,
                 param_dtype=compute.param_dtype, init_std=cfg.initializer_range, lora=adapter, lora_target=target,
                 lora_param_dtype=lora.param_dtype if lora is not None else None, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head causal self-attention with partial rotary on q and k; owns the layout of its KV cache."""

    def __init__(self, cfg: PhiConfig, compute: Compute, *, rngs: nnx.Rngs, lora: Adapters | None = None):
        d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.impl, self.platform, self.num_heads, self.head_dim = compute.attention_impl, compute.platform, n, h
        self.fallback = compute.attention_fallback  # what runs a call the resolved impl cannot (Compute)
        # q, k and v in one [embed, 3, heads, head_dim] kernel: one matmul, heads visible to tensor parallelism.
        self.qkv = _dense(cfg, compute, rngs, (d,), (3, n, h), ("embed",), ("qkv", "heads", "head_dim"),
                          lora=lora, target="qkv")
        self.dense = _dense(cfg, compute, rngs, (n, h), (d,), ("heads", "head_dim"), ("embed",), lora=lora,
                            target="dense")

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
            return self.dense(attention(q, k, v, segment_ids=segment_ids, impl=self.impl, platform=self.platform,
                                        fallback=self.fallback)), None
        b, t, n, h = k.shape
        rows = index if index.ndim == 0 else jnp.repeat(index, n)  # the cache's rows are (batch, head) pairs
        write = lambda c, new: write_slots(  # in place: the Sampler and the engine donate the cache
            c, new.transpose(0, 2, 1, 3).reshape(b * n, t, h).astype(c.dtype), rows)
        cache = LayerCache(write(cache.k, k), write(cache.v, v))
        out = cached_attention(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask)
        return self.dense(out), cache


class MLP(nnx.Module):
    def __init__(self, cfg: PhiConfig, compute: Compute, *, rngs: nnx.Rngs, lora: Adapters | None = None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.fc1 = _dense(cfg, compute, rngs, (d,), (f,), ("embed",), ("mlp",), activation="gelu_new", lora=lora,
                          target="fc1")
        self.fc2 = _dense(cfg, compute, rngs, (f,), (d,), ("mlp",), ("embed",), lora=lora, target="fc2")

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(constrain(self.fc1(x), ("batch", "length", "act_mlp")))


class Block(nnx.Module):
    """Parallel residual block: h + Attention(LN(h)) + MLP(LN(h)), one LayerNorm shared by both branches."""

    def __init__(self, cfg: PhiConfig, compute: Compute, *, rngs: nnx.Rngs, lora: Adapters | None = None):
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=compute.dtype,
                                         param_dtype=compute.param_dtype, rngs=rngs)
        self.attn = Attention(cfg, compute, rngs=rngs, lora=lora)
        self.mlp = MLP(cfg, compute, rngs=rngs, lora=lora)

    def __call__(self, h, rope, segment_ids, cache=None, **cache_args):
        x = self.input_layernorm(h)
        attn_out, cache = self.attn(x, rope, segment_ids, cache, **cache_args)
        h = (attn_out + self.mlp(x)) + h  # the summation order of Hugging Face's PhiDecoderLayer
        return constrain(h, ("batch", "length", "act_embed")), cache


class Phi(nnx.Module):
    """phi-1 / phi-1.5 causal language model: `model(tokens)` -> (float32 logits [batch, seq, vocab], cache).

    `cfg` is the architecture, `compute` how it runs (dtypes, kernels, remat); the model keeps both, `compute`
    resolved for its platform (JAX's default backend unless `compute` is already resolved: phi_jax.config.Compute).
    `scan_layers` is the layer layout (module docstring): True stacks the layers for a scan (training,
    checkpoints), False keeps one Block per layer (decoding). `lora` (phi_jax.lora.LoraConfig) adds LoRA adapters
    (nnx.LoRAParam, in compute.param_dtype) to its target Dense layers; the base parameters are then held in
    `lora.base_dtype` when it is set (frozen bf16 weights under fp32 adapters)."""

    def __init__(self, cfg: PhiConfig, compute: Compute = Compute(), *, rngs: nnx.Rngs, scan_layers: bool = True,
                 lora: LoraConfig | None = None):
        compute = compute if compute.platform else compute.resolve(default_platform())
        self.cfg, self.compute, self.scan_layers, self.lora = cfg, compute, scan_layers, lora
        adapters = Adapters(lora, compute.param_dtype) if lora is not None else None
        if lora is not None and lora.base_dtype is not None:
            compute = compute.replace(param_dtype=lora.base_dtype)  # the base parameters' dtype
        self.embed_tokens = param(rngs, nnx.initializers.normal(cfg.initializer_range),
                                  (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), compute.param_dtype)
        if scan_layers:
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, compute, rngs=rngs, lora=adapters)

            self.layers: Block | nnx.List[Block] = make_blocks(rngs)
        else:
            self.layers = nnx.List([Block(cfg, compute, rngs=rngs, lora=adapters) for _ in range(cfg.num_layers)])
        self.final_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=compute.dtype,
                                         param_dtype=compute.param_dtype, rngs=rngs)
        self.lm_head = _dense(cfg, compute, rngs, (cfg.hidden_size,), (cfg.vocab_size,), ("embed",), ("vocab",),
                              impl="xla")

    def _blocks(self) -> list[Block]:
        """One Block per layer. Stacked layers are sliced out of the stacked parameters (a copy on XLA:CPU)."""
        if not self.scan_layers:
            return list(self.layers)
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(self.cfg.num_layers)]

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        """An empty cache of `max_len` slots per row (dtype: the compute dtype by default)."""
        dtype = self.compute.dtype if dtype is None else dtype
        blocks = self.layers if not self.scan_layers else [self.layers] * self.cfg.num_layers
        return Cache(tuple(b.attn.init_cache(batch, max_len, dtype) for b in blocks),
                     jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: Cache | None = None, *,
                 segment_ids: jax.Array | None = None, logits_at: jax.Array | None = None
                 ) -> tuple[jax.Array, Cache | None]:
        """tokens, positions, segment_ids: int [batch, seq]; positions default to 0, 1, ... from the cache index.

        Packed rows: positions restart per document and segment ids keep attention within it. With a cache, the
        tokens fill slots [index, index + seq) and segment id 0 marks padding (left-padded prompts). Returns float32
        logits [batch, seq, vocab] and the updated cache (None without one). `logits_at` (int [batch]): only the
        logits of that position of each row, [batch, 1, vocab] (a prefill needs its last token's only: lm_head
        over every position is 40% of a small model's prefill)."""
        if cache is None:
            h = self.hidden_states(tokens, positions, segment_ids=segment_ids)
        else:
            h, rope = self._embed(tokens, positions, cache.index)
            h, cache = self._decode_layers(h, rope, segment_ids, cache)
            h = self.final_layernorm(h)
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[:, None, None], axis=1)
        logits = self.lm_head(h, out_dtype=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab")), cache

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """The final-layernormed hidden states [batch, seq, hidden] of whole sequences (what lm_head reads), in the
        compute dtype; tokens, positions, segment_ids as in `__call__` without a cache."""
        h, rope = self._embed(tokens, positions, 0)
        keys = layer_dropout_keys(self.cfg.num_layers)  # LoRA dropout in training: one key per layer, else Nones
        if self.scan_layers:  # one scan over the stacked layers: compile time does not grow with depth
            graphdef, state = nnx.split(self.layers)
            layer = self._layer_fn(graphdef, rope, segment_ids)
            h = jax.lax.scan(lambda h, xs: (layer(h, *xs), None), h, (state, keys))[0]
        else:
            for block, key in zip(self.layers, [None] * self.cfg.num_layers if keys is None else keys, strict=True):
                graphdef, state = nnx.split(block)
                h = self._layer_fn(graphdef, rope, segment_ids)(h, state, key)
        return self.final_layernorm(h)

    def _embed(self, tokens, positions, start) -> tuple[jax.Array, Rope]:
        """The token embeddings [B, T, D] and the rotary tables of `positions` (default: start, start + 1, ...)."""
        cfg = self.cfg
        batch, seq = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.expand_dims(start, -1) + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        rope = rotary_tables(positions, cfg.rotary_dim, cfg.rope_theta)
        # Gather the (vocab/FSDP-sharded) table whole in the compute dtype before the lookup: a gather from a
        # sharded table makes the SPMD partitioner replicate it implicitly, and less efficiently.
        table = constrain(self.embed_tokens[...].astype(self.compute.dtype), (None, None))
        return constrain(jnp.take(table, tokens, axis=0), ("batch", "length", "act_embed")), rope

    def _layer_fn(self, graphdef: nnx.GraphDef, rope, segment_ids):
        """(h, layer state) -> h for one layer of whole sequences, rematerialised as compute.remat says."""
        def layer(h, state, dropout_key=None):
            with dropout_scope(dropout_key):
                return nnx.merge(graphdef, state)(h, rope, segment_ids)[0]

        if self.compute.remat == "none":
            return layer
        return jax.checkpoint(layer, policy=REMAT_POLICIES[self.compute.remat], prevent_cse=not self.scan_layers)

    def _decode_layers(self, h, rope, segment_ids, cache: Cache):
        """Writes the tokens' slots into the cache and runs the layers one after another, each on its own cache."""
        batch, seq = h.shape[:2]
        segment_ids = jnp.ones((batch, seq), jnp.int32) if segment_ids is None else segment_ids
        slots = write_slots(cache.segment_ids, segment_ids, cache.index)
        q_start = cache.index if cache.index.ndim == 0 else cache.index[:, None, None]  # per row: [B, 1, 1]
        mask = causal_segment_mask(segment_ids, seq, kv_segment_ids=slots, q_start=q_start)  # built once
        layers = []
        for block, layer_cache in zip(self._blocks(), cache.layers, strict=True):
            h, layer_cache = block(h, rope, segment_ids, layer_cache, index=cache.index, mask=mask)
            layers.append(layer_cache)
        return h, Cache(tuple(layers), slots, cache.index + seq)


def init_model(cfg: PhiConfig, seed: int = 0, compute: Compute = Compute(), *, scan_layers: bool = True,
               lora: LoraConfig | None = None) -> Phi:
    """A freshly initialised model. The two layouts draw their weights differently: one seed gives different
    weights in each (`to_layout` moves a model's own weights)."""
    return Phi(cfg, compute, rngs=nnx.Rngs(params=seed), scan_layers=scan_layers, lora=lora)


def abstract_model(cfg: PhiConfig, compute: Compute = Compute(), *, scan_layers: bool = True,
                   lora: LoraConfig | None = None) -> Phi:
    """The model's structure and shapes without allocating any parameter (for full-size checks and restores)."""
    return nnx.eval_shape(lambda: Phi(cfg, compute, rngs=nnx.Rngs(params=0), scan_layers=scan_layers, lora=lora))


def count_params(model: Phi) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_paths(model: Phi) -> dict[str, nnx.Variable]:
    """The model's parameters by dotted path: "layers.attn.qkv.kernel" ([layers, ...]) in the stacked layout,
    "layers.3.attn.qkv.kernel" in the unrolled one."""
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def split_layer(path: str) -> tuple[str, int | None]:
    """An unrolled parameter path as (its stacked-layout path, its layer): "layers.3.attn.qkv.kernel" ->
    ("layers.attn.qkv.kernel", 3); any other path -> (path, None)."""
    parts = path.split(".")
    if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit():
        return ".".join([parts[0], *parts[2:]]), int(parts[1])
    return path, None


def stacked_params(model: Phi) -> dict[str, jax.Array]:
    """Every parameter by its stacked-layout path, per-layer ones with a leading layers axis, whichever layout
    `model` has (the names checkpoints and Hugging Face conversion use). Nothing of `model` changes; for an
    unrolled model the per-layer arrays are stacked into new arrays."""
    if model.scan_layers:
        return {p: v[...] for p, v in param_paths(model).items()}
    out, layers = {}, {}
    for p, v in param_paths(model).items():
        name, layer = split_layer(p)
        if layer is None:
            out[name] = v[...]
        else:
            layers.setdefault(name, {})[layer] = v[...]
    out.update({name: jnp.stack([by_layer[i] for i in range(len(by_layer))]) for name, by_layer in layers.items()})
    return out


def from_params(cfg: PhiConfig, compute: Compute, params: dict, *, scan_layers: bool = True,
                lora: LoraConfig | None = None) -> Phi:
    """A model holding `params` (stacked-layout paths -> arrays, as `stacked_params`, checkpoints and Hugging Face
    conversion give them), cast to compute.param_dtype. Each entry is popped from `params` once placed, so a caller
    that hands over its only reference to the dict holds one copy of the weights at a time (plus one stacked
    parameter while it is split into layers). Every parameter's path and shape is checked. With `lora`, `params`
    holds the adapters too ("layers.attn.qkv.lora.lora_a", ...), each cast to its own variable's dtype."""
    model = abstract_model(cfg, compute, scan_layers=scan_layers, lora=lora)
    targets: dict[str, list[tuple[int | None, nnx.Variable]]] = {}
    for p, var in param_paths(model).items():
        name, layer = split_layer(p)
        targets.setdefault(name, []).append((layer, var))
    if missing := sorted(set(targets) - set(params)):
        raise ValueError(f"No value for parameters {missing} of the {cfg.num_layers}-layer model.")
    if unknown := sorted(set(params) - set(targets)):
        raise ValueError(f"Parameters {unknown} are not part of the model (known: {sorted(targets)}).")
    for name, places in targets.items():
        value = params.pop(name)
        stacked_shape = (cfg.num_layers, *places[0][1].shape) if places[0][0] is not None else places[0][1].shape
        if tuple(value.shape) != tuple(stacked_shape):
            raise ValueError(f"Parameter {name} has shape {tuple(value.shape)}, expected {tuple(stacked_shape)}.")
        for layer, var in places:
            var.set_value(jnp.asarray(value if layer is None else value[layer], var.dtype))
        del value
    return model


def warn_if_slow_to_decode(model: Phi) -> None:
    """One warning when `model` is about to decode on CPU in the stacked layout (the module docstring says why)."""
    if model.scan_layers and model.compute.platform == "cpu":
        logging.getLogger("phi_jax").warning(
            "decoding a model with stacked layers: on CPU each decode step copies every layer's weights; load it "
            "with scan_layers=False (phi_jax.from_pretrained) for the fast layout")


def to_layout(model: Phi, *, scan_layers: bool) -> Phi:
    """`model`'s parameters in the layer layout `scan_layers` as a new model (its own arrays); `model` itself is
    unchanged. A model already in that layout is returned as it is."""
    if model.scan_layers == scan_layers:
        return model
    return from_params(model.cfg, model.compute, stacked_params(model), scan_layers=scan_layers, lora=model.lora)
