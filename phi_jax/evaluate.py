"""Perplexity and bits per byte: `python -m phi_jax.evaluate --model=PATH (--text_file=F | --data_dir=D --split=val)`.

The token stream is cut into consecutive windows of `seq_len` inputs whose targets are the next tokens, so every
token but the first is predicted exactly once, with at most `seq_len - 1` tokens of context. Bits per byte divide the
total negative log-likelihood (in bits) by the UTF-8 bytes of the decoded stream, which makes tokenizers comparable.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi_jax.cli import OneLineParser, bounded_int, non_empty
from phi_jax.config import DTYPES, Compute
from phi_jax.loading import Source, load, resolve
from phi_jax.model import Phi


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef, state, inputs, targets, segment_ids):
    logits, _ = nnx.merge(graphdef, state)(inputs, segment_ids=segment_ids)  # [B, S, V] float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return target_logp, jnp.argmax(logits, axis=-1) == targets


def token_logprobs(model: Phi, inputs: np.ndarray, targets: np.ndarray,
                   segment_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(log p(targets[b, s] | inputs[b, :s+1]), whether each target is the argmax), both [batch, seq]."""
    graphdef, state = nnx.split(model)
    segment_ids = np.ones_like(inputs) if segment_ids is None else segment_ids
    logp, greedy = _token_logprobs(graphdef, state, jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32),
                                   jnp.asarray(segment_ids, jnp.int32))
    return np.asarray(logp), np.asarray(greedy)


def evaluate_tokens(model: Phi, tokens: np.ndarray, *, seq_len: int, batch_size: int) -> dict:
    """Summed negative log-likelihood (nats) and count of every token of `tokens` [n] after the first."""
    if not 0 < seq_len <= model.cfg.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} must be in [1, {model.cfg.max_position_embeddings}] (the model's "
                         "context, max_position_embeddings).")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    tokens = np.asarray(tokens, np.int32)
    if len(tokens) < 2:
        raise ValueError(f"{len(tokens)} token(s) to evaluate: the first token is context only, so perplexity needs "
                         "at least 2.")
    if (bad := tokens[(tokens < 0) | (tokens >= model.cfg.vocab_size)]).size:
        raise ValueError(f"Token ids {sorted(set(bad.tolist()))[:5]} are outside the model's vocabulary of "
                         f"{model.cfg.vocab_size}: the tokens were made by another tokenizer.")
    n_windows = max(1, math.ceil((len(tokens) - 1) / seq_len))
    n_batches = math.ceil(n_windows / batch_size)
    total = np.zeros((n_batches * batch_size, seq_len + 1), np.int32)
    mask = np.zeros((n_batches * batch_size, seq_len), bool)
    for w in range(n_windows):
        piece = tokens[w * seq_len:w * seq_len + seq_len + 1]
        total[w, :len(piece)] = piece
        mask[w, :len(piece) - 1] = True
    nll, count = 0.0, 0
    for b in range(n_batches):
        rows = slice(b * batch_size, (b + 1) * batch_size)
        # Padding sits after the real tokens of a window (causal attention never looks ahead), so segment 1 is fine.
        logp, _ = token_logprobs(model, total[rows, :-1], total[rows, 1:])
        nll -= float(logp[mask[rows]].sum(dtype=np.float64))
        count += int(mask[rows].sum())
    return {"nll": nll, "tokens": count}


def evaluate(model: Phi, tokenizer, tokens: np.ndarray, *, seq_len: int, batch_size: int,
             text: str | None = None) -> dict:
    """Perplexity and bits per byte of a token stream (the bytes of `text`, or of the decoded tokens)."""
    start = time.perf_counter()
    result = evaluate_tokens(model, tokens, seq_len=seq_len, batch_size=batch_size)
    num_bytes = len((text if text is not None else tokenizer.decode(tokens.tolist())).encode("utf-8"))
    nll, count = result["nll"], result["tokens"]
    return {"loss": nll / max(count, 1), "perplexity": math.exp(nll / max(count, 1)),
            "bits_per_byte": nll / math.log(2) / max(num_bytes, 1), "tokens": count, "bytes": num_bytes,
            "seq_len": seq_len, "seconds": time.perf_counter() - start}


def training_seq_len(path: str | Path | Source, step: int | None = None) -> int | None:
    """The seq_len a training workdir's run used (from its newest or `step` checkpoint's saved run config), or
    None for anything else (a Hugging Face directory or Hub id)."""
    from phi_jax.checkpoint import read_meta

    source = resolve(path)
    if not source.is_workdir:
        return None
    run = read_meta(source.path, step).get("run", {})  # read-only: a reader never touches a run's checkpoints
    return int(run["seq_len"]) if run.get("seq_len") else None


def default_seq_len(path: str | Path | Source, model: Phi, step: int | None = None) -> tuple[int, str]:
    """(window length, where it comes from): the run's training seq_len when saved, else the model's context."""
    trained = training_seq_len(path, step)
    if trained is not None:
        return trained, "the training seq_len"
    return model.cfg.max_position_embeddings, "the model's context, max_position_embeddings"


def main(argv: Sequence[str] | None = None) -> None:
    from phi_jax.generate import resolve_model_arg

    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=non_empty,
                        help="a training workdir, a Hugging Face phi directory (local or gs://) or a Hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text_file", type=non_empty, help="a UTF-8 text file")
    source.add_argument("--data_dir", type=non_empty, help="token shards written by python -m tools.prepare_data")
    parser.add_argument("--split", default=None, type=non_empty, help="the split of --data_dir (default: val)")
    parser.add_argument("--max_tokens", type=bounded_int(0, 2**63 - 1), default=0,
                        help="evaluate only the first N tokens (0 = all; at least 2: the first is context only)")
    parser.add_argument("--seq_len", type=bounded_int(0, 2**31 - 1), default=0,
                        help="window length; 0 = the run's training seq_len (a workdir), else the model's context")
    parser.add_argument("--batch_size", type=bounded_int(1, 2**31 - 1), default=8)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--step", type=bounded_int(0, 2**63 - 1), default=None)
    parser.add_argument("--tokenizer", type=non_empty, default=None)
    parser.add_argument("--out", type=non_empty, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.split is not None and not args.data_dir:
        parser.error(f"--split={args.split} chooses a split of --data_dir; a --text_file has none.")
    args.split = args.split or "val"
    if args.max_tokens == 1:
        parser.error("--max_tokens=1: the first token is context only; evaluate at least 2 tokens (0 = all).")
    if args.text_file and not Path(args.text_file).is_file():
        parser.error(f"--text_file={args.text_file} does not exist or is not a file.")
    if args.data_dir and not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir={args.data_dir} does not exist; write shards with python -m tools.prepare_data.")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        parser.error(f"--out={args.out}: the directory {Path(args.out).resolve().parent} does not exist.")
    text = read_text_file(args.text_file) if args.text_file else None  # before the (slow) model

    model_source = resolve_model_arg(parser, args.model)  # once: a Hub id is looked up once
    model, tok = load(model_source, compute=Compute(dtype=args.dtype, param_dtype=args.dtype), step=args.step,
                      tokenizer=args.tokenizer)
    if text is not None:
        tokens = np.asarray(tok.encode(text), np.int32)
        where = f"--text_file={args.text_file}"
    else:
        tokens, where = data_dir_tokens(args.data_dir, args.split, tok, model.cfg.vocab_size), \
            f"--data_dir={args.data_dir} (split {args.split})"
    if args.max_tokens:
        tokens, text = tokens[:args.max_tokens], None
    if len(tokens) < 2:
        raise ValueError(f"{where} holds {len(tokens)} token(s) to evaluate: the first token is context only, so "
                         "perplexity needs at least 2; give a longer text.")
    seq_len, why = (args.seq_len, "--seq_len") if args.seq_len else default_seq_len(model_source, model, args.step)
    result = evaluate(model, tok, tokens, seq_len=seq_len, batch_size=args.batch_size, text=text)
    source = args.text_file or f"{args.data_dir}:{args.split}"
    result.update(model=str(args.model), source=source, seq_len_from=why)
    print(f"{args.model} on {source}: {result['tokens']} tokens ({result['bytes']} bytes) predicted in windows of "
          f"{seq_len} tokens ({why}), {result['seconds']:.1f} s\n"
          f"perplexity {result['perplexity']:.4f}  bits/byte {result['bits_per_byte']:.4f}  loss {result['loss']:.4f}")
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)


def read_text_file(path: str) -> str:
    """The UTF-8 text of --text_file; an empty file or one that is not UTF-8 text is a ValueError naming it."""
    data = Path(path).read_bytes()
    if not data.strip():
        raise ValueError(f"--text_file={path} is empty{' (whitespace only)' if data else ''}: there is nothing to "
                         "evaluate; pass a text file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text_file={path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}): "
                         "pass a text file, or convert it (iconv -t UTF-8).") from None


def data_dir_tokens(data_dir: str, split: str, tok, model_vocab_size: int) -> np.ndarray:
    """Every token of `split` of prepared shards, after the check training makes: the shards were made with the
    model's tokenizer (their metadata records its sha256) and their ids fit the model's embedding."""
    from phi_jax.data.shards import SplitReader, check_compatible, read_metadata

    meta = read_metadata(data_dir)
    check_compatible(meta, tok, fix=f"evaluate on shards made with the model's tokenizer (python -m "
                                    f"tools.prepare_data --tokenizer={tok.path}), or pass --tokenizer=FILE if the "
                                    "model was trained with the shards' own")
    if meta["max_token_id"] >= model_vocab_size:
        raise ValueError(f"--data_dir={data_dir} holds token id {meta['max_token_id']} but the model embeds only "
                         f"{model_vocab_size} ids: the shards were made for another model.")
    reader = SplitReader(data_dir, split, meta)
    return reader.tokens(0, reader.num_tokens)


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
