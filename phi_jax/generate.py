"""Text generation with a KV cache: `python -m phi_jax.generate --model=PATH --prompt="def fib(n):"`.

How it works, top to bottom in this file:
1. `Sampler(model)` reads the model's weights as they are (it changes nothing of the model) and jits two steps
   that it owns. Load a model for decoding with `scan_layers=False` (`load(..., scan_layers=False)`): on CPU the
   unrolled layout decodes faster (phi_jax/model.py says why).
2. The prompts are left-padded to a power-of-two bucket with segment id 0, positions starting at 0 at each prompt's
   first real token. Attention is causal and same-segment, so padding never reaches a real token and every row
   generates exactly what that prompt would generate alone.
3. `prefill` runs the padded prompts through the model into an empty cache and samples the first token.
4. `decode_step` feeds one token per row at the cache's next slot and samples the next one. The cache is donated,
   so each step updates it in place; the host dispatches step i+1 before reading step i's tokens.

One prefill program per (batch, prompt bucket, cache length) and one decode program per (batch, cache length):
neither a new prompt length inside a bucket nor a new token recompiles (`Sampler.compilations()` counts them).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import numbers
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi_jax.cli import OneLineParser, bounded_float, bounded_int, non_empty
from phi_jax.config import DTYPES, Compute
from phi_jax.loading import Source, load, resolve
from phi_jax.model import Phi, warn_if_slow_to_decode

log = logging.getLogger("phi_jax")

MIN_BUCKET = 16


def bucket(length: int, context: int) -> int:
    """The padded prompt length: the next power of two (at least MIN_BUCKET), capped at the context."""
    return min(max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(length, 1))))), max(context, length))


def sample(logits: jax.Array, key: jax.Array, greedy: bool, temperature, top_k, top_p, num_ids=None) -> jax.Array:
    """Next token ids [B] from fp32 logits [B, V]: argmax, or sampling after temperature, top-k and top-p. Ids
    >= `num_ids` (the tokenizer's size, when the embedding has more rows than it has ids) are never chosen."""
    vocab = logits.shape[-1]
    if num_ids is not None:
        logits = jnp.where(jnp.arange(vocab) < num_ids, logits, -jnp.inf)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    sorted_logits = jnp.where(jnp.arange(vocab) < k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose probability reaches top_p (the first token always stays).
    keep = jnp.maximum(jnp.sum((jnp.cumsum(probs, axis=-1) - probs) < top_p, axis=-1), 1)  # [B]
    threshold = jnp.take_along_axis(sorted_logits, (keep - 1)[:, None], axis=-1)  # [B, 1]
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Sampler:
    """Generates token ids from a model: `Sampler(model)(prompts, max_new_tokens=64)`.

    Keep one Sampler per model: it owns the compiled prefill and decode programs. It reads the model's weights as
    they are when it is made and never changes the model."""

    def __init__(self, model: Phi):
        warn_if_slow_to_decode(model)
        self.model, self.cfg = model, model.cfg
        graphdef, state = nnx.split(model)
        # The jitted steps take the weights as a flat list of arrays: flattening nnx States and hashing a GraphDef
        # on every call costs more than a whole decode step of the quickstart model (docs/PERFORMANCE.md).
        self._leaves, treedef = jax.tree.flatten(state)
        self._merge = lambda leaves: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        self._prefill = jax.jit(self._prefill_fn, static_argnums=0, donate_argnums=5)
        self._decode_step = jax.jit(self._decode_step_fn, static_argnums=0, donate_argnums=4)

    def _prefill_fn(self, greedy, leaves, tokens, positions, segment_ids, cache, key, sampling):
        """Fills the cache with the (left-padded) prompts [B, P]. Returns the first new token [B], the position
        of the token after each prompt [B], the step counter and the cache."""
        last = jnp.full(tokens.shape[:1], tokens.shape[1] - 1, jnp.int32)
        logits, cache = self._merge(leaves)(tokens, positions, cache, segment_ids=segment_ids, logits_at=last)
        first = sample(logits[:, -1], jax.random.fold_in(key, 0), greedy, *sampling)
        return first, jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32), jnp.int32(1), cache

    def _decode_step_fn(self, greedy, leaves, tokens, positions, cache, key, step, sampling):
        """Runs one token per row [B] at `positions` [B]; returns the next token, the next positions and step,
        and the cache. All it needs comes from the previous step on the device: the host only reads tokens."""
        logits, cache = self._merge(leaves)(tokens[:, None], positions[:, None], cache)
        return (sample(logits[:, -1], jax.random.fold_in(key, step), greedy, *sampling), positions + 1,
                step + 1, cache)

    def compilations(self) -> dict[str, int]:
        """How many programs the prefill and decode step have compiled so far (for tests and benchmarks)."""
        return {"prefill": self._prefill._cache_size(), "decode_step": self._decode_step._cache_size()}

    def __call__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
                 on_token: Callable[[int, int], None] | None = None, num_ids: int | None = None) -> list[list[int]]:
        """Up to `max_new_tokens` ids after each prompt (lists of ids); temperature 0 is greedy.

        A row stops after `eos_id` (included in its output) when given. `on_token(row, token)` is called as each
        token is produced. Generation also stops where the longest prompt reaches the model's context. `num_ids`
        (a tokenizer's size, below the model's vocab_size) keeps the ids the tokenizer lacks from being produced.
        """
        if not prompts:
            return []
        context = self.cfg.max_position_embeddings
        check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        check_prompts([len(p) for p in prompts], context)
        vocab = self.cfg.vocab_size
        if num_ids is not None and not 0 < num_ids <= vocab:
            raise ValueError(f"num_ids={num_ids} must be in [1, {vocab}] (the model's vocab_size).")
        if bad := sorted({t for p in prompts for t in p if not 0 <= t < (num_ids or vocab)}):
            raise ValueError(f"Prompt token ids {bad[:5]} are outside [0, {num_ids or vocab}): the tokenizer does "
                             "not match the model.")
        longest = max(len(p) for p in prompts)
        max_new = min(max_new_tokens, context - longest)
        if max_new < max_new_tokens:
            log.warning("max_new_tokens=%d cut to %d: the longest prompt reaches the context of %d tokens",
                        max_new_tokens, max_new, context)
        if max_new <= 0:
            return [[] for _ in prompts]

        batch, padded = len(prompts), bucket(longest, context)
        tokens, segments, positions = (np.zeros((batch, padded), np.int32) for _ in range(3))
        for row, p in enumerate(prompts):
            tokens[row, padded - len(p):] = p
            segments[row, padded - len(p):] = 1
            positions[row, padded - len(p):] = np.arange(len(p))
        cache_len = -(-(padded + max_new) // MIN_BUCKET) * MIN_BUCKET  # fewer distinct decode programs
        cache = self.model.init_cache(batch, cache_len)
        greedy = temperature == 0.0
        sampling = (jnp.float32(temperature if not greedy else 1.0), jnp.int32(top_k), jnp.float32(top_p),
                    jnp.int32(num_ids or vocab))
        key = jax.random.key(seed)

        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(batch, bool)
        tok, pos, step, cache = self._prefill(greedy, self._leaves, tokens, positions, segments, cache, key,
                                              sampling)
        for i in range(max_new):
            # Dispatch the next step before reading this one's tokens, so that the host's work (and the callback)
            # overlaps the device's. After the last row stops, one step too many may run; its token is dropped.
            if i < max_new - 1:
                nxt, pos, step, cache = self._decode_step(greedy, self._leaves, tok, pos, cache, key, step,
                                                          sampling)
            host = np.asarray(tok)
            for row in range(batch):
                if not done[row]:
                    out[row].append(int(host[row]))
                    if on_token is not None:
                        on_token(row, int(host[row]))
                    if eos_id is not None and host[row] == eos_id:
                        done[row] = True
            if done.all() or i == max_new - 1:
                break
            tok = nxt
        return out


SEED_LIMIT = 2**32  # as training's --config.seed


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int) -> None:
    """The sampling settings a generation accepts (checked before any work); each error names the setting."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0.")
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy; 0.2-1.0 samples).")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be a number in (0, 1] (1 = no nucleus cut).")
    if not _is_int(top_k) or not 0 <= top_k < 2**31:
        raise ValueError(f"top_k={top_k!r} must be an integer in [0, 2**31) (0 = no top-k cut).")
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32).")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_prompts(lengths: Sequence[int], context: int) -> None:
    """Prompts must hold at least one token and fit the model's context (checked before any work)."""
    if min(lengths) == 0:
        raise ValueError("An empty prompt has no token to start from; prepend a BOS/EOS id.")
    if max(lengths) > context:
        raise ValueError(f"A prompt of {max(lengths)} tokens is longer than the model's context of {context} "
                         "tokens (max_position_embeddings); shorten it or truncate it from the left.")


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt; an empty prompt starts from the BOS (else EOS) id."""
    start = getattr(tokenizer, "bos_id", None)
    start = tokenizer.eos_id if start is None or start < 0 else start
    return [tokenizer.encode(p) or [start] for p in prompts]


def generate(sampler: Sampler, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
             on_token: Callable[[int, int], None] | None = None) -> list[str]:
    """Generates a continuation of each prompt (texts); the returned texts exclude the prompt and the EOS token.
    Only ids the tokenizer has are generated (a model's embedding may have more rows: phi-1.5 has 51200 for the
    tokenizer's 50295 ids)."""
    eos = tokenizer.eos_id if stop_at_eos else None
    out = sampler(encode_prompts(tokenizer, prompts), max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, seed=seed, eos_id=eos, on_token=on_token,
                  num_ids=min(tokenizer.vocab_size, sampler.cfg.vocab_size))
    return [tokenizer.decode([t for t in o if eos is None or t != eos]) for o in out]


class _Streamer:
    """Prints row 0's text as it grows (decoding all its ids each time keeps multi-byte characters whole)."""

    def __init__(self, tokenizer, eos_id, stream=sys.stdout):
        self.tokenizer, self.eos_id, self.stream = tokenizer, eos_id, stream
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, row: int, token: int) -> None:
        if row != 0 or token == self.eos_id:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.stream.write(text[len(self.printed):])
            self.stream.flush()
            self.printed = text


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=non_empty,
                        help="a training workdir, a Hugging Face phi directory (local or gs://) or a Hub id")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max_new_tokens", type=bounded_int(1, 2**31 - 1), default=128)
    parser.add_argument("--temperature", type=bounded_float(0, 1e6), default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=bounded_int(0, 2**31 - 1), default=0, help="0 = no top-k cut")
    parser.add_argument("--top_p", type=bounded_float(0, 1, low_open=True), default=1.0, help="1 = no nucleus cut")
    parser.add_argument("--seed", type=bounded_int(0, SEED_LIMIT - 1), default=0)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--step", type=bounded_int(0, 2**63 - 1), default=None,
                        help="workdir checkpoint step (default: newest)")
    parser.add_argument("--tokenizer", type=non_empty, default=None, help="tokenizer file (default: the model's own)")
    parser.add_argument("--json", action="store_true", help="print all completions as JSON at the end")
    args = parser.parse_args(argv)
    model, tok = load(resolve_model_arg(parser, args.model), compute=Compute(dtype=args.dtype, param_dtype=args.dtype),
                      step=args.step, tokenizer=args.tokenizer, scan_layers=False)
    if tok.vocab_size < model.cfg.vocab_size:
        log.info("the tokenizer %s has %d ids, the model's embedding %d rows: ids %d..%d are never generated",
                 tok.path.name, tok.vocab_size, model.cfg.vocab_size, tok.vocab_size, model.cfg.vocab_size - 1)
    ids = encode_prompts(tok, args.prompt)
    check_prompts([len(p) for p in ids], model.cfg.max_position_embeddings)  # before anything is printed
    sampler = Sampler(model)
    single = len(args.prompt) == 1 and not args.json
    if single:
        sys.stdout.write(args.prompt[0])
    streamer = _Streamer(tok, tok.eos_id) if single else None
    texts = generate(sampler, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_token=streamer)
    if single:
        sys.stdout.write(texts[0][len(streamer.printed):] + "\n")
    elif args.json:
        print(json.dumps([{"prompt": p, "completion": t} for p, t in zip(args.prompt, texts, strict=True)], indent=2))
    else:
        for p, t in zip(args.prompt, texts, strict=True):
            print(f"--- {p!r}\n{p}{t}")


def resolve_model_arg(parser: argparse.ArgumentParser, path: str) -> Source:
    """`loading.resolve(path)` for a `--model` flag: a path that is not a model is a usage error that says what is
    accepted (a training workdir, a Hugging Face directory, or a Hub id). (A missing --tokenizer, or a workdir
    without a complete checkpoint, is reported as itself by the loading that follows.)"""
    try:
        return resolve(path)
    except FileNotFoundError as e:
        parser.error(f"--model={path}: {e}")


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
