"""The one generation interface the evaluations use: `generate_batch(prompts, max_new_tokens, stop) -> ids`.

`prompts` are token-id lists; `stop(row_ids) -> bool` says whether a row's generated ids so far end its
completion (a stop sequence appeared); the result holds each prompt's generated ids, stopped rows cut anywhere
after their stop (callers cut the text at the stop sequence). Any batched engine fits behind it:
`engine_generate_batch` runs phi_jax.engine.Engine (continuous batching: a row that stops is replaced by the next
prompt at once), `sampler_generate_batch` phi_jax.generate.Sampler over fixed-size, left-padded batches (a batch
runs until its last row stops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol


class GenerateBatch(Protocol):
    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]: ...


class _AllStopped(Exception):
    pass


def engine_generate_batch(model, *, slots: int, eos_id: int | None, temperature: float = 0.0, top_p: float = 1.0,
                          seed: int = 0) -> GenerateBatch:
    """A GenerateBatch over phi_jax.engine.Engine with `slots` rows: every prompt is queued at once, a row that
    produces EOS or meets `stop` is cancelled and its slot taken by the next prompt in the same step. Prompt i
    samples with seed `seed + i`: the same prompts give the same ids, whatever shares the batch."""
    from phi_jax.engine import Engine, SamplingParams

    if slots < 1:
        raise ValueError(f"slots={slots} must be >= 1.")
    engine = Engine(model, None, slots=slots)

    def generate_batch(prompts, max_new_tokens, stop=None):
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i,
                                 stop_token_ids=() if eos_id is None else (eos_id,)) for i in range(len(prompts))]

        def on_update(request, delta):
            if stop is not None and delta.token_ids and not request.finished and stop(request.token_ids):
                engine.cancel(request)

        return [r.token_ids for r in engine.generate(prompts, params, on_update=on_update)]

    generate_batch.engine = engine
    return generate_batch


def sampler_generate_batch(model, *, batch_size: int, eos_id: int | None, temperature: float = 0.0,
                           top_p: float = 1.0, seed: int = 0) -> GenerateBatch:
    """A GenerateBatch over phi_jax.generate.Sampler. Prompts are sorted by length (similar lengths share a
    padding bucket) and run `batch_size` at a time; a short last batch is filled with copies of its first prompt, so
    one compiled program serves every batch of a bucket. A batch ends when every row has produced EOS or met `stop`.
    Batch i samples with seed `seed + i`: the same prompts give the same ids."""
    from phi_jax.generate import Sampler

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    sampler = Sampler(model)

    def generate_batch(prompts, max_new_tokens, stop=None):
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        out: list[list[int]] = [[] for _ in prompts]
        for n, start in enumerate(range(0, len(order), batch_size)):
            rows = order[start:start + batch_size]
            batch = [list(prompts[i]) for i in rows]
            batch += [batch[0]] * (batch_size - len(batch))
            ids: list[list[int]] = [[] for _ in batch]
            finished = [False] * len(rows) + [True] * (batch_size - len(rows))

            def on_token(row, token, ids=ids, finished=finished):
                if finished[row]:
                    return
                ids[row].append(token)
                if token == eos_id or (stop is not None and stop(ids[row])):
                    finished[row] = True
                    if all(finished):
                        raise _AllStopped

            with contextlib.suppress(_AllStopped):
                sampler(batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + n,
                        eos_id=eos_id, on_token=on_token)
            for r, i in enumerate(rows):
                out[i] = ids[r]
        return out

    generate_batch.sampler = sampler
    return generate_batch
