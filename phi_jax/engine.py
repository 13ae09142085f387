"""Continuous batching over a KV cache: the engine behind `phi_jax.serve`, evaluation and data generation.

    engine = Engine(model, tokenizer, slots=16)
    done = engine.generate([ids_a, ids_b], SamplingParams(max_tokens=64))      # in process, blocking
    engine.start(); request = engine.submit(ids, params, on_update=callback)   # a server: a background loop

The shape is JetStream's prefill / insert / generate with vLLM's scheduling at step boundaries:
- The decode cache has `slots` rows; each holds one request's keys and values from slot 0 on, with its own write
  index (model.Cache's per-row index). Its length (`capacity`) grows and shrinks with the longest live row, over
  powers of two and the steps halfway between them (64, 96, 128, 192, ...), so that a decode step reads at most
  1.5x the cache the requests need (reading the cache is most of a step's time once the rows are a few hundred
  tokens long: docs/PERFORMANCE.md, Serving).
- **prefill**: a prompt runs alone into a one-row cache, right-padded to a bucket of the same ladder (16 ... `chunk`);
  a longer prompt runs in chunks of `chunk` tokens, one chunk per engine step, so that it never stalls the decoding
  rows for long. Its last position gives the first token (and the prompt's log-probabilities when asked: echo).
- **insert**: the prefilled rows are copied into a free slot of the decode cache.
- **decode**: every live slot advances one token per step, each row sampled with its own parameters and key.
  Requests join and leave between steps; a finished or cancelled request frees its slot at once. The next step is
  dispatched before the host reads this step's tokens (as generate.Sampler does), so a row that stops is run one
  step too many and that token is dropped.

Compiled programs: prefill per (bucket, echo), decode per (capacity, logprobs), and the small
insert and resize programs per pair of shapes: a bounded set, however many distinct request lengths arrive
(`compilations()`; `warmup()` compiles the common ones). Greedy output of a request is the same, token for token,
whatever shares the batch: rows never see each other (segment ids), and each row samples from its own logits.

On a mesh, parameters follow the training rules of phi_jax.sharding (tensor parallel over heads, MLP and vocab;
replicated over the data axes) and the slots are split over the data axes. The cache's rows merge batch and heads
(model.LayerCache), so it is not split by heads: it is replicated over `tensor`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phi_jax.model import Cache, LayerCache, Phi, warn_if_slow_to_decode
from phi_jax.sharding import activation_sharding, logical_to_spec, strategy_rules

log = logging.getLogger("phi_jax")

MIN_BUCKET = 16  # the shortest prompt bucket (as generate.Sampler's)
MIN_CAPACITY = 64  # the shortest decode cache


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _ladder(low: int, high: int) -> list[int]:
    """Sizes from `low` to `high`: the powers of two, from 64 on with the halfway steps between them (16, 32, 64,
    96, 128, 192, 256, 384, ...), then `high`. A decode step reads its whole cache, so a size at most 1.5x what is
    needed, rather than 2x, is a third less memory traffic for each step, for twice as many programs."""
    sizes, p = [], _pow2(low)
    while p < high:
        sizes += [s for s in ((p, p * 3 // 2) if p >= 64 else (p,)) if low <= s < high]
        p *= 2
    return [*sizes, high]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops. temperature 0 is greedy (argmax); otherwise the logits are
    divided by `temperature`, cut to the `top_k` most likely (0: all) and to the smallest set whose probability
    reaches `top_p`, and sampled with a key made from `seed` modulo 2**32 (a random one when None).

    A request stops after `max_tokens`, at a token of `stop_token_ids` or the tokenizer's EOS (unless `ignore_eos`;
    the token is kept in the ids and left out of the text), or where its text holds one of `stop` (the text is cut
    before it). `logprobs`: the log-probability of each generated token and its `logprobs` most likely alternatives
    (0: the chosen token's only); `prompt_logprobs` the same for every prompt token after the first (echo, scoring).
    Log-probabilities are the model's own distribution, before temperature, top-k and top-p."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def errors(self, max_logprobs: int) -> list[str]:
        """What is wrong with these parameters (empty when nothing), each naming the value and the rule."""
        e = []
        if self.max_tokens < 0 or (self.max_tokens == 0 and self.prompt_logprobs is None):
            e.append(f"max_tokens={self.max_tokens} must be >= 1 (0 only to score a prompt: prompt logprobs/echo)")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            e.append(f"temperature={self.temperature} must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            e.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            e.append(f"top_k={self.top_k} must be >= 0 (0: no limit)")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= max_logprobs:
                e.append(f"{name}={v} must be between 0 and {max_logprobs}")
        if any(not s for s in self.stop):
            e.append("stop strings must not be empty")
        return e


@dataclasses.dataclass
class Delta:
    """What a request gained since its last update: new token ids (with their log-probabilities when asked), new
    text (held back while it may be the start of a stop string), and the finish reason once done."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_logprobs: list[float | None] | None = None  # with the first update only
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    time: float = 0.0


class Request:
    """One prompt in the engine; `result()` waits for it. Its fields are written by the engine's loop only."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
                 on_update: Callable[[Request, Delta], None] | None = None):
        self.id = request_id or f"req-{next(self._ids)}"
        self.prompt_ids, self.params, self.on_update = list(prompt_ids), params, on_update
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
        self.text, self.finish_reason = "", None
        self.arrival, self.first_token_time, self.finish_time = time.perf_counter(), None, None
        self.cancelled = False
        self._done = threading.Event()
        # The engine's bookkeeping.
        seed = params.seed % 2**32 if params.seed is not None else secrets.randbits(32)
        self._key = np.asarray([0, seed], np.uint32)  # jax.random.key(seed)'s data (threefry2x32)
        self._planned = 0  # tokens produced or in flight
        self._slot: int | None = None
        self._prefill: tuple | None = None  # (cache, next position) while a long prompt is prefilled in chunks
        self._ids_seen, self._read, self._streamed = 0, 0, ""  # incremental detokenisation, text given out

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self, timeout: float | None = None) -> Request:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """Next token [B] from fp32 logits [B, V], each row with its own key, temperature, top-k and top-p; a row with
    temperature 0 takes the argmax (exactly the greedy token)."""
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    sorted_logits = jnp.where(jnp.arange(vocab) < k[:, None], sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = jnp.maximum(jnp.sum((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None], axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_logits, (keep - 1)[:, None], axis=-1)
    scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def _next_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                 top_p: jax.Array) -> jax.Array:
    """`sample_rows` when a row samples, else the argmax alone: one program for both, which skips sorting the
    vocabulary when every row is greedy."""
    greedy = lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(jnp.any(temperature > 0), lambda: sample_rows(logits, keys, temperature, top_k, top_p),
                        greedy)


def _row_keys(key_data: jax.Array, counters: jax.Array) -> jax.Array:
    """Token `counters[i]` of row i is sampled with fold_in(key_i, counters[i]): reproducible whatever the batch."""
    return jax.vmap(lambda k, c: jax.random.fold_in(jax.random.wrap_key_data(k), c))(key_data, counters)


class Engine:
    """Continuous batching of generation requests over `slots` rows of a KV cache (see the module docstring).

    `max_len` bounds prompt + generated tokens per request (default: the model's context); `chunk` is the longest
    prompt prefilled in one piece (and the chunk of longer ones); `max_logprobs` the most alternatives a request may
    ask for. `mesh`: shard over it (tensor parallel with phi_jax.sharding's rules)."""

    def __init__(self, model: Phi, tokenizer=None, *, slots: int = 8, max_len: int | None = None, chunk: int = 512,
                 max_logprobs: int = 20, mesh: Mesh | None = None):
        context = model.cfg.max_position_embeddings
        max_len = context if max_len is None else max_len
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1.")
        if not 1 <= max_len <= context:
            raise ValueError(f"max_len={max_len} must be between 1 and the model's context of {context} tokens.")
        if chunk < MIN_BUCKET or chunk != _pow2(chunk):
            raise ValueError(f"chunk={chunk} must be a power of two >= {MIN_BUCKET}.")
        if max_logprobs < 0:
            raise ValueError(f"max_logprobs={max_logprobs} must be >= 0.")
        warn_if_slow_to_decode(model)
        self.model, self.cfg, self.tokenizer = model, model.cfg, tokenizer
        self.slots, self.max_len, self.chunk = slots, max_len, min(chunk, max_len)
        self.max_logprobs, self.mesh = max_logprobs, mesh
        self.eos_id = None if tokenizer is None else tokenizer.eos_id
        graphdef, state = nnx.split(model)
        if mesh is not None:
            self._rules = strategy_rules("dp")[0]  # parameters: tensor parallel, replicated over data and fsdp
            if slots % (mesh.shape["data"] * mesh.shape["fsdp"]):
                raise ValueError(f"slots={slots} must be divisible by the mesh's data x fsdp = "
                                 f"{mesh.shape['data'] * mesh.shape['fsdp']} (the slots are split over them).")
            state = jax.tree.map(self._place_param, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        self._leaves, treedef = jax.tree.flatten(state)
        self._merge = lambda leaves: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        # The programs (module docstring); leaves first, static flags before them.
        self._prefill = jax.jit(self._prefill_fn, static_argnums=0, donate_argnums=4)
        self._decode = jax.jit(self._decode_fn, static_argnums=0, donate_argnums=3)
        self._insert = jax.jit(self._insert_fn, donate_argnums=0)
        self._resize = jax.jit(self._resize_fn, static_argnums=1)  # a new shape: nothing to donate into

        # Decode state: the cache and last tokens on the device; the rest on the host, sent with each step.
        self.capacity = min(MIN_CAPACITY, self.max_len)
        self._cache = self._new_cache(slots, self.capacity, batch_sharded=True)
        self._tokens = jnp.zeros(slots, jnp.int32) if mesh is None else jax.device_put(
            np.zeros(slots, np.int32), self._sharding(True, 1))
        self._rows: list[Request | None] = [None] * slots
        self._index = np.zeros(slots, np.int32)
        self._key_data = np.zeros((slots, 2), np.uint32)
        self._counters = np.zeros(slots, np.int32)
        self._temperature = np.zeros(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._top_p = np.ones(slots, np.float32)
        self._pending = None  # the dispatched decode step whose tokens the host has not read yet

        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.generated_tokens = 0  # counters for metrics
        self.steps = 0

    # ---- placement -------------------------------------------------------------------------------------------
    def _place_param(self, v: nnx.Variable) -> nnx.Variable:
        names = v.get_metadata().get("out_sharding")
        spec = logical_to_spec(names, self._rules) if names else PartitionSpec()
        return v.replace(jax.device_put(v.get_value(), NamedSharding(self.mesh, spec)))

    def _sharding(self, batch_sharded: bool, ndim: int) -> NamedSharding:
        """Split over the data axes along the first dim (the slots), or replicated."""
        if not (batch_sharded and ndim):
            return NamedSharding(self.mesh, PartitionSpec())
        lead = logical_to_spec(("batch",), self._rules)[0]
        return NamedSharding(self.mesh, PartitionSpec(lead, *([None] * (ndim - 1))))

    def _put(self, x: np.ndarray):
        """A per-slot host array as a step's argument (on a mesh: split like the slots)."""
        return x if self.mesh is None else jax.device_put(x, self._sharding(True, x.ndim))

    def _new_cache(self, batch: int, length: int, batch_sharded: bool) -> Cache:
        cache = self.model.init_cache(batch, length)
        if self.mesh is None:
            return cache
        return jax.tree.map(lambda x: jax.device_put(x, self._sharding(batch_sharded, x.ndim)), cache)

    def _pin(self, cache: Cache) -> Cache:
        """Inside a decode-cache program: keep the cache's layout (the next call must find the same shardings)."""
        if self.mesh is None:
            return cache
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self._sharding(True, x.ndim)), cache)

    def _context(self, batch_sharded: bool):
        if self.mesh is None:
            return _nullcontext()
        rules = self._rules if batch_sharded else {**self._rules, "batch": None}
        return activation_sharding(self.mesh, rules)

    # ---- the device programs ---------------------------------------------------------------------------------
    def _prefill_fn(self, echo, leaves, tokens, start, cache, n_valid, next_token, key_data, temperature,
                    top_k, top_p):
        """One chunk of one prompt: tokens [1, C] at positions start .. start + C (the first n_valid real) into a
        one-row cache. Returns the token sampled after the chunk's last real token with its log-probability and
        top alternatives, the cache, and with `echo` each position's log-probability of the token after it
        (`next_token` follows the chunk) with the top alternatives."""
        with self._context(batch_sharded=False):
            c = tokens.shape[1]
            seg = (jnp.arange(c) < n_valid).astype(jnp.int32)[None]
            positions = (start + jnp.arange(c, dtype=jnp.int32))[None]
            logits, cache = self._merge(leaves)(tokens, positions, Cache(cache.layers, cache.segment_ids, start),
                                                segment_ids=seg, logits_at=None if echo else (n_valid - 1)[None])
            # [1, V]: without echo, logits_at computed the last real token's alone.
            last = jax.lax.dynamic_index_in_dim(logits[0], n_valid - 1, keepdims=True) if echo else logits[0]
            keys = _row_keys(key_data[None], jnp.zeros((1,), jnp.int32))
            first = _next_tokens(last, keys, temperature[None], top_k[None], top_p[None])
            logp = jax.nn.log_softmax(last)
            out = (first[0], jnp.take_along_axis(logp, first[:, None], -1)[0, 0],
                   *(x[0] for x in jax.lax.top_k(logp, self.max_logprobs)), cache)
            if not echo:
                return out
            logp_all = jax.nn.log_softmax(logits[0])  # [C, V]
            following = jnp.concatenate([tokens[0, 1:], next_token[None]])
            chosen = jnp.take_along_axis(logp_all, following[:, None], -1)[:, 0]
            return (*out, chosen, *jax.lax.top_k(logp_all, self.max_logprobs))

    def _decode_fn(self, logprobs, leaves, tokens, cache, index, live, key_data, counters, temperature,
                   top_k, top_p):
        """One token for every slot: tokens [B] at cache slots `index` [B]; rows with live 0 are idle (they write
        padding). Returns the next tokens [B], their log-probabilities and top alternatives, and the cache."""
        with self._context(batch_sharded=True):
            cache = Cache(cache.layers, cache.segment_ids, index)
            logits, cache = self._merge(leaves)(tokens[:, None], index[:, None], cache, segment_ids=live[:, None])
            logits = logits[:, 0]
            nxt = _next_tokens(logits, _row_keys(key_data, counters), temperature, top_k, top_p)
            out = (nxt,)
            if logprobs:
                logp = jax.nn.log_softmax(logits)
                out = (nxt, jnp.take_along_axis(logp, nxt[:, None], -1)[:, 0], *jax.lax.top_k(logp, self.max_logprobs))
            return out, self._pin(cache)

    def _insert_fn(self, cache, tokens, layers, slot, length, first):
        """Copies a prefilled one-row cache (layers of [heads, P, head_dim]) into row `slot` of the decode cache,
        marks its first `length` slots as the request's, and sets its next input token."""
        n = self.cfg.num_heads
        put = lambda c, p: jax.lax.dynamic_update_slice(c, p.astype(c.dtype), (slot * n, 0, 0))
        new_layers = tuple(LayerCache(put(c.k, p.k), put(c.v, p.v)) for c, p in zip(cache.layers, layers, strict=True))
        row = (jnp.arange(cache.segment_ids.shape[1]) < length).astype(jnp.int32)[None]
        seg = jax.lax.dynamic_update_slice(cache.segment_ids, row, (slot, 0))
        return self._pin(Cache(new_layers, seg, cache.index)), tokens.at[slot].set(first)

    def _resize_fn(self, cache, length):
        """The decode cache with `length` slots per row (the first ones kept; new ones empty)."""
        old = cache.segment_ids.shape[1]
        fit = lambda x: x[:, :length] if length <= old else jnp.pad(x, [(0, 0), (0, length - old)] + [(0, 0)] *
                                                                    (x.ndim - 2))
        layers = tuple(LayerCache(fit(c.k), fit(c.v)) for c in cache.layers)
        return self._pin(Cache(layers, fit(cache.segment_ids), cache.index))

    def warmup(self) -> None:
        """Compiles, by running them on empty rows, the programs a stream of requests uses: every prefill bucket and
        chunk, and at every capacity the decode step, the inserts, the growth to it and the shrinking from it.
        Log-probability and echo variants compile when first used."""
        if self.has_work():
            raise RuntimeError("warmup() runs before the first request.")
        params = (jnp.zeros(2, jnp.uint32), jnp.float32(0), jnp.int32(0), jnp.float32(1))
        blocks = {}
        for width, size in [(b, self._short_cache(b)) for b in self.buckets()] + [(self.chunk, c) for c in
                                                                                 self._long_caches()]:
            out = self._prefill(False, self._leaves, jnp.zeros((1, width), jnp.int32), jnp.int32(0),
                                self._new_cache(1, size, batch_sharded=False), jnp.int32(1), jnp.int32(0), *params)
            blocks[size] = out[4].layers
        idle = np.zeros(self.slots, np.int32)
        host = (idle, idle, np.zeros((self.slots, 2), np.uint32), idle, self._temperature, self._top_k, self._top_p)
        for capacity in self.capacities():
            if capacity != self.capacity:
                self._cache, self.capacity = self._resize(self._cache, capacity), capacity
            out, self._cache = self._decode(False, self._leaves, self._tokens, self._cache,
                                            *(self._put(x) for x in host))
            for size, layers in blocks.items():
                if size <= capacity:
                    self._cache, self._tokens = self._insert(self._cache, self._tokens, layers, jnp.int32(0),
                                                             jnp.int32(0), jnp.int32(0))
        caps = self.capacities()
        for capacity in reversed(caps[:caps.index(self.capacity)]):  # the halvings, one at a time
            self._cache, self.capacity = self._resize(self._cache, capacity), capacity
        jax.block_until_ready(self._cache)

    def compilations(self) -> dict[str, int]:
        """How many programs each step has compiled (bounded by the buckets, whatever the requests)."""
        return {"prefill": self._prefill._cache_size(), "decode": self._decode._cache_size(),
                "insert": self._insert._cache_size(), "resize": self._resize._cache_size()}

    def capacities(self) -> list[int]:
        """The decode cache lengths the engine may use."""
        return _ladder(min(MIN_CAPACITY, self.max_len), self.max_len)

    def _bucket(self, n: int) -> int:
        """The padded length of a prompt of n <= chunk tokens."""
        return next(b for b in self.buckets() if b >= n)

    def buckets(self) -> list[int]:
        """The padded lengths of prompts prefilled in one piece."""
        return _ladder(min(MIN_BUCKET, self.chunk), self.chunk)

    def _short_cache(self, bucket: int) -> int:
        """The one-row cache of a prompt prefilled in one piece: at least the smallest decode capacity, so that
        the shortest buckets share their insert programs."""
        return max(bucket, self.capacities()[0])

    def _long_cache(self, n: int) -> int:
        """The one-row cache of a prompt of n > chunk tokens, prefilled in chunks."""
        return min(_pow2(n), self.max_len)

    def _long_caches(self) -> list[int]:
        return sorted({self._long_cache(n) for n in (self.chunk << i for i in range(1, 32)) if n // 2 < self.max_len}
                      - {self._long_cache(self.chunk)}) if self.chunk < self.max_len else []

    # ---- requests --------------------------------------------------------------------------------------------
    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError (one line naming the value and the limit) for a request the engine cannot run."""
        errors = params.errors(self.max_logprobs)
        n = len(prompt_ids)
        if n == 0:
            errors.append("the prompt is empty: it needs at least one token")
        elif n + params.max_tokens > self.max_len:
            limit = ("the model's context" if self.max_len == self.cfg.max_position_embeddings
                     else "the engine's max_len")
            errors.append(f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) is {n + params.max_tokens} "
                          f"tokens, more than {limit} of {self.max_len} tokens; shorten the prompt or lower max_tokens")
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            errors.append(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if errors:
            raise ValueError("; ".join(errors) + ".")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
               request_id: str | None = None, on_update: Callable[[Request, Delta], None] | None = None) -> Request:
        """Queues a request (checked first: ValueError) and returns it; `on_update(request, delta)` is called from
        the engine's loop as it progresses."""
        self.check(prompt_ids, params)
        request = Request(prompt_ids, params, request_id, on_update)
        with self._lock:
            if self._stopping:
                raise RuntimeError("The engine is shutting down and takes no new requests.")
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stops a request (finish_reason "abort"); its slot is free from the next step on."""
        with self._lock:
            request.cancelled = True
            self._lock.notify_all()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def live_slots(self) -> int:
        return sum(r is not None for r in self._rows)

    def has_work(self) -> bool:
        return bool(self._waiting) or self.live_slots > 0 or self._pending is not None

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 = SamplingParams(), *, on_update: Callable[[Request, Delta], None] | None = None) -> list[Request]:
        """Runs the prompts (token ids) to completion; blocking. With the loop thread running they join its batch;
        otherwise this thread runs the loop until they are done. `on_update` as in `submit` (it may `cancel`)."""
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        for p, sp in zip(prompts, params, strict=True):
            self.check(p, sp)
        requests = [self.submit(p, sp, on_update=on_update) for p, sp in zip(prompts, params, strict=True)]
        if self._thread is None:
            while not all(r.finished for r in requests):
                self.step()
        return [r.result() for r in requests]

    # ---- the loop --------------------------------------------------------------------------------------------
    def step(self) -> None:
        """One scheduling step: dispatch a decode step for every running row, read the previous step's tokens,
        free the slots of finished and cancelled requests, then prefill and insert waiting requests.

        When requests wait and a slot is free or about to be, the step in flight is read first and they are
        prefilled before the next decode step is dispatched: they start one decode step sooner (time to first
        token) and join that step."""
        admitted = False
        if self._pending is not None and self._waiting and any(
                r is None or r.finished or r.cancelled or r._planned >= r.params.max_tokens for r in self._rows):
            self._read_step(*self._pending)
            self._pending = None
            self._free_slots()
            self._admit()
            admitted = True
        running = [s for s, r in enumerate(self._rows)
                   if r is not None and not r.finished and not r.cancelled and r._planned < r.params.max_tokens]
        pending = None
        if running:
            self._ensure_capacity(max(int(self._index[s]) for s in running) + 1)
            live = np.zeros(self.slots, np.int32)
            live[running] = 1
            index = np.where(live == 1, self._index, 0).astype(np.int32)  # idle rows write padding at slot 0
            counters = np.where(live == 1, self._counters, 0).astype(np.int32)
            logprobs = any(self._rows[s].params.logprobs is not None for s in running)
            out, self._cache = self._decode(logprobs, self._leaves, self._tokens, self._cache,
                                            self._put(index), self._put(live), self._put(self._key_data),
                                            self._put(counters), self._put(self._temperature), self._put(self._top_k),
                                            self._put(self._top_p))
            self._tokens = out[0]
            record = [(s, self._rows[s]) for s in running]
            for s in running:
                self._index[s] += 1
                self._counters[s] += 1
                self._rows[s]._planned += 1
            pending = (out, record)
            self.steps += 1
        if self._pending is not None:
            self._read_step(*self._pending)
        self._pending = pending
        self._free_slots()
        if not admitted:
            self._admit()

    def _read_step(self, out, record) -> None:
        host = [np.asarray(x) for x in out]
        now = time.perf_counter()
        for s, request in record:
            if request.finished or request.cancelled:
                continue  # a step run after its request stopped: the token is dropped
            lp = (float(host[1][s]), list(zip(host[3][s].tolist(), host[2][s].tolist(), strict=True))) \
                if len(host) > 1 else None
            self._append(request, int(host[0][s]), lp, now)

    def _append(self, request: Request, token: int, lp, now: float, with_prompt: bool = False) -> None:
        """Adds a generated token to a request: stop rules, text, and its update to the caller."""
        p = request.params
        request.token_ids.append(token)
        self.generated_tokens += 1
        if p.logprobs is not None and lp is not None:
            request.logprobs.append(lp[0])
            request.top_logprobs.append(lp[1][:p.logprobs])
        finish = None
        if token in p.stop_token_ids or (token == self.eos_id and not p.ignore_eos):
            finish = "stop"
        elif self.tokenizer is not None:
            finish = self._detokenize(request)
        if finish is None and len(request.token_ids) >= p.max_tokens:
            finish = "length"
        self._emit(request, [token], finish, now, with_prompt)

    def _detokenize(self, request: Request) -> str | None:
        """Extends request.text with the new token's text (decoding only the last few ids: the prefix/read offsets
        of vLLM's and TGI's incremental detokenizers) and applies the stop strings."""
        ids = request.token_ids
        prefix = self.tokenizer.decode(ids[request._ids_seen:request._read])
        text = self.tokenizer.decode(ids[request._ids_seen:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return None  # an incomplete UTF-8 sequence: wait for the next token
        before = len(request.text)
        request.text += text[len(prefix):]
        request._ids_seen, request._read = request._read, len(ids)
        if request.params.stop:
            longest = max(len(s) for s in request.params.stop)
            window = max(0, before - longest + 1)
            hits = [i for i in (request.text.find(s, window) for s in request.params.stop) if i >= 0]
            if hits:
                request.text = request.text[:min(hits)]
                return "stop"
        return None

    def _final_text(self, request: Request) -> None:
        """At the end, the text is the decoding of every generated id but a final stop token (as generate.generate
        and transformers give it), cut before the first stop string. It extends the incremental text, except where
        a tokenizer decodes a run of byte pieces differently whole than in parts (tokenizers' ByteFallback on
        invalid UTF-8): then what was already streamed stands and the final text differs from it."""
        ids = request.token_ids
        p = request.params
        if ids and (ids[-1] in p.stop_token_ids or (ids[-1] == self.eos_id and not p.ignore_eos)):
            ids = ids[:-1]
        text = self.tokenizer.decode(ids)
        hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
        request.text = text[:min(hits)] if hits else text

    def _emit(self, request: Request, new_ids: list[int], finish: str | None, now: float,
              with_prompt: bool = False) -> None:
        if finish is not None:
            if self.tokenizer is not None:
                self._final_text(request)
            request.finish_reason, request.finish_time = finish, now
        hold = 0 if finish is not None or not request.params.stop else max(len(s) for s in request.params.stop) - 1
        visible = request.text[:len(request.text) - hold]
        text = ""
        if visible.startswith(request._streamed):
            text, request._streamed = visible[len(request._streamed):], visible
        if request.first_token_time is None:
            request.first_token_time = now
        if request.on_update is not None:
            p = request.params
            delta = Delta(new_ids, text, finish_reason=finish, time=now)
            if p.logprobs is not None and new_ids:
                delta.logprobs, delta.top_logprobs = request.logprobs[-1:], request.top_logprobs[-1:]
            if with_prompt:
                delta.prompt_logprobs, delta.prompt_top_logprobs = request.prompt_logprobs, request.prompt_top_logprobs
            try:
                request.on_update(request, delta)
            except Exception:  # a caller's callback must not stop the engine
                log.exception("on_update of request %s failed", request.id)
        if finish is not None:
            request._done.set()

    def _finish_now(self, request: Request, reason: str) -> None:
        self._emit(request, [], reason, time.perf_counter())

    def _free_slots(self) -> None:
        """Finished and cancelled requests leave their slots (a token still in flight for one is dropped when read:
        the step's record holds the request, not the slot)."""
        for s, request in enumerate(self._rows):
            if request is not None and request.cancelled and not request.finished:
                self._finish_now(request, "abort")
            if request is not None and request.finished:
                self._rows[s] = None

    def _admit(self) -> None:
        """Prefills waiting requests into free slots: whole short prompts, one chunk of a long one per step."""
        with self._lock:
            for r in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(r)
                self._finish_now(r, "abort")
        budget = self.chunk
        while self._waiting and budget > 0:
            free = [s for s, r in enumerate(self._rows) if r is None]
            request = self._waiting[0]
            if not free and request.params.max_tokens > 0:
                return
            n = len(request.prompt_ids)
            if n <= self.chunk:
                done = self._prefill_whole(request)
                budget -= self._bucket(n)
            else:
                done = self._prefill_chunk(request)
                budget -= self.chunk
            if done is None:
                return  # a long prompt continues next step
            with self._lock:
                self._waiting.popleft()
            self._start(request, free[0] if free else None, *done)

    def _params(self, request: Request):
        p = request.params
        return (jnp.asarray(request._key), jnp.float32(p.temperature), jnp.int32(p.top_k), jnp.float32(p.top_p))

    def _prefill_whole(self, request: Request):
        n = len(request.prompt_ids)
        size = self._bucket(n)
        tokens = np.zeros((1, size), np.int32)
        tokens[0, :n] = request.prompt_ids
        cache = self._new_cache(1, self._short_cache(size), batch_sharded=False)
        echo = request.params.prompt_logprobs is not None
        out = self._prefill(echo, self._leaves, jnp.asarray(tokens), jnp.int32(0),
                            cache, jnp.int32(n), jnp.int32(0), *self._params(request))
        return out, [out] if echo else None

    def _prefill_chunk(self, request: Request):
        n, c = len(request.prompt_ids), self.chunk
        echo = request.params.prompt_logprobs is not None
        if request._prefill is None:
            request._prefill = (self._new_cache(1, self._long_cache(n), batch_sharded=False), 0, [])
        cache, start, echoes = request._prefill
        piece = request.prompt_ids[start:start + c]
        tokens = np.zeros((1, c), np.int32)
        tokens[0, :len(piece)] = piece
        following = request.prompt_ids[start + c] if start + c < n else 0
        out = self._prefill(echo, self._leaves, jnp.asarray(tokens), jnp.int32(start),
                            cache, jnp.int32(len(piece)), jnp.int32(following), *self._params(request))
        if echo:
            echoes.append(out)
        if start + c < n:
            request._prefill = (out[4], start + c, echoes)
            return None
        request._prefill = None
        return out, echoes if echo else None

    def _start(self, request: Request, slot: int | None, out, echoes) -> None:
        """A prefilled request: its first token, prompt log-probabilities, and its slot (unless already done)."""
        first, lp, top_lp, top_ids, cache = out[:5]
        now = time.perf_counter()
        n = len(request.prompt_ids)
        if echoes is not None:
            k = request.params.prompt_logprobs
            chosen = np.concatenate([np.asarray(e[5]) for e in echoes])[:n - 1]
            tops = [np.concatenate([np.asarray(e[i]) for e in echoes])[:n - 1] for i in (6, 7)]
            request.prompt_logprobs = [None, *chosen.tolist()]
            request.prompt_top_logprobs = [None, *[list(zip(ids[:k].tolist(), lps[:k].tolist(), strict=True))
                                                   for lps, ids in zip(*tops, strict=True)]]
        if request.cancelled:
            self._finish_now(request, "abort")
            return
        if request.params.max_tokens == 0:
            self._emit(request, [], "length", now, with_prompt=True)
            return
        token = int(first)
        request._planned = 1
        lp_pair = (float(lp), list(zip(np.asarray(top_ids).tolist(), np.asarray(top_lp).tolist(), strict=True)))
        self._append(request, token, lp_pair, now, with_prompt=echoes is not None)
        if request.finished:
            return
        self._ensure_capacity(max(cache.segment_ids.shape[1], n + 1))
        self._cache, self._tokens = self._insert(self._cache, self._tokens, cache.layers, jnp.int32(slot),
                                                 jnp.int32(n), jnp.int32(token))
        p = request.params
        self._rows[slot], request._slot = request, slot
        self._index[slot], self._counters[slot] = n, 1
        self._key_data[slot] = request._key
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = p.temperature, p.top_k, p.top_p

    def _ensure_capacity(self, needed: int) -> None:
        """Grows the decode cache to hold `needed` slots per row, or shrinks it to the next smaller capacity when
        that still leaves a quarter of it free (so that it does not grow back within a few steps). It moves one
        capacity at a time (a long prompt may take several steps at once), so that the resize programs are the
        neighbouring pairs that warmup() compiles."""
        live = [int(self._index[s]) + 1 for s, r in enumerate(self._rows) if r is not None]
        needed = max([needed, *live])
        caps = self.capacities()
        at = caps.index(self.capacity)
        while caps[at] < needed:
            at += 1
            self._cache = self._resize(self._cache, caps[at])
        if at > 0 and 3 * caps[at - 1] >= 4 * needed:
            at -= 1
            self._cache = self._resize(self._cache, caps[at])
        self.capacity = caps[at]

    # ---- the loop thread (a server) --------------------------------------------------------------------------
    def start(self) -> None:
        """Runs the loop in a background thread until `stop()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="phi_jax-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.has_work() and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self.has_work():
                    return
            try:
                self.step()
            except Exception:
                log.exception("engine step failed; every request in flight is aborted")
                self._abort_all()

    def _abort_all(self) -> None:
        with self._lock:
            requests = [r for r in self._rows if r is not None] + list(self._waiting)
            self._waiting.clear()
        self._rows = [None] * self.slots
        self._pending = None
        for r in requests:
            if not r.finished:
                self._finish_now(r, "abort")

    def stop(self, timeout: float | None = None) -> bool:
        """Takes no new requests, lets those queued or running finish (at most `timeout` seconds, then cancels
        them), and ends the loop thread. Returns whether everything finished in time."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        drained = not self._thread.is_alive()
        if not drained:
            with self._lock:
                for r in [*self._waiting, *(r for r in self._rows if r is not None)]:
                    r.cancelled = True
                self._lock.notify_all()
            self._thread.join()
        self._thread = None
        return drained


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
