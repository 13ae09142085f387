"""Execution-based evaluation: a model completes each problem's prompt, the sandbox runs the program made of the
prompt, the completion and the problem's tests, and pass@k counts the programs that passed.

A `Problem` carries everything task-specific (humaneval.py, mbpp.py, gsm8k.py make them); `evaluate` is the one
loop: generate `num_samples` completions per problem through a GenerateBatch, cut each at the first stop
sequence, run every program in the sandbox in parallel, and score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from phi_jax.evals.generation import GenerateBatch
from phi_jax.evals.metrics import mean_and_stderr, pass_at_k
from phi_jax.evals.sandbox import Result, Sandbox

KS = (1, 10, 100)


class DataUnavailable(Exception):
    """A benchmark's data cannot be read here (the message says what to provide); the suite reports the task as
    skipped with this reason."""


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str  # what the model continues
    stop: tuple[str, ...]  # the completion ends before the first of these
    program: Callable[[str], str]  # completion -> the program the sandbox runs
    check: Callable[[Result], bool] = lambda result: result.passed  # whether a run solved the problem


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def generate_completions(problems: Sequence[Problem], generate_batch: GenerateBatch, tokenizer, *,
                         num_samples: int, max_new_tokens: int, max_prompt_tokens: int | None = None
                         ) -> list[list[str]]:
    """`num_samples` completions (text, cut at the problem's stop sequences) per problem. A prompt longer than
    `max_prompt_tokens` keeps its last tokens (the model's context minus the new tokens)."""
    eos = tokenizer.eos_id
    prompts, owners = [], []
    for p, problem in enumerate(problems):
        ids = tokenizer.encode(problem.prompt) or [eos]
        if max_prompt_tokens is not None:
            ids = ids[-max_prompt_tokens:]
        prompts += [ids] * num_samples
        owners += [p] * num_samples

    def decode(ids):
        return tokenizer.decode([t for t in ids if t != eos])

    # Problems of one benchmark share their stop sequences; run each distinct set as one call.
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, o in enumerate(owners):
        groups.setdefault(problems[o].stop, []).append(i)
    outs = [None] * len(prompts)
    for stops, rows in groups.items():
        stop_fn = (lambda ids, stops=stops: any(s in decode(ids) for s in stops)) if stops else None
        for i, ids in zip(rows, generate_batch([prompts[i] for i in rows], max_new_tokens, stop_fn), strict=True):
            outs[i] = ids
    completions: list[list[str]] = [[] for _ in problems]
    for o, ids in zip(owners, outs, strict=True):
        completions[o].append(cut_at_stop(decode(ids), problems[o].stop))
    return completions


def score(problems: Sequence[Problem], completions: Sequence[Sequence[str]], sandbox: Sandbox) -> dict:
    """Runs every completion's program; returns pass@k for each k <= the samples per problem (with its standard
    error over problems) and one record per sample."""
    flat = [(p, c) for p, problem_completions in enumerate(completions) for c in problem_completions]
    results = sandbox.run([problems[p].program(c) for p, c in flat])
    correct = [0] * len(problems)
    samples = []
    for (p, completion), result in zip(flat, results, strict=True):
        ok = problems[p].check(result)
        correct[p] += ok
        samples.append({"task_id": problems[p].task_id, "completion": completion, "passed": ok,
                        "status": result.status, "reason": result.reason, "stderr_tail": result.stderr[-500:]})
    n = len(completions[0])
    if any(len(c) != n for c in completions):
        raise ValueError("Every problem needs the same number of samples.")
    metrics = {}
    for k in KS:
        if k <= n:
            value, stderr = mean_and_stderr([pass_at_k(n, c, k) for c in correct])
            metrics[f"pass@{k}"] = {"value": value, "stderr": stderr}
    return {"metrics": metrics, "num_problems": len(problems), "num_samples": n, "correct": correct,
            "samples": samples}


def evaluate(problems: Sequence[Problem], generate_batch: GenerateBatch, tokenizer, sandbox: Sandbox, *,
             num_samples: int = 1, max_new_tokens: int = 384, max_prompt_tokens: int | None = None) -> dict:
    completions = generate_completions(problems, generate_batch, tokenizer, num_samples=num_samples,
                                       max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens)
    return score(problems, completions, sandbox)
