"""GSM8K (Cobbe et al. 2021) "via coding", as the phi-1.5 report scores it: the model writes a Python function
whose returned number is the answer; the sandbox runs it and the number is compared with the reference.

The report states the method (zero-shot pass@1, the model's code is run and its result taken as the answer) but
publishes no prompt text; the prompt here is phi_jax's, in HumanEval's style, the question as the docstring of a
function the model completes:

    def solution():
        \"\"\"Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
        How many clips did Natalia sell altogether in April and May?
        Return the answer as a number.\"\"\"

The completion ends before HumanEval's stop sequences; the program is prompt + completion + a line that prints
`ANSWER_TAG repr(solution())`. The last such line of the output is parsed by `parse_number` (so is the
reference, the text after GSM8K's "####"); equal within 1e-6 relative is correct. Data: `DATA_DIR/gsm8k.jsonl`
(question, answer; GSM8K's own format), else Hugging Face's openai/gsm8k "main" test split from its cache.
"""

from __future__ import annotations

import math
import re

from phi_jax.evals.code_eval import Problem
from phi_jax.evals.humaneval import STOP
from phi_jax.evals.mbpp import read_jsonl_or_hf
from phi_jax.evals.sandbox import Result

HF_DATASET = ("openai/gsm8k", "main", "test")
ANSWER_TAG = "__phi_jax_gsm8k_answer__"
_NUMBER = re.compile(r"^[-+]?(\d+(,\d{3})*|\d*)(\.\d+)?$")


def parse_number(text: str | None) -> float | None:
    """The number a text states: "1,234" -> 1234, "-5" -> -5, "3.50" -> 3.5, "$1,234.00" -> 1234, "12%" -> 12,
    "'42'" -> 42, "7." -> 7; None for no number ("", "None", "True", "12 apples", "1/2", "nan")."""
    if text is None:
        return None
    t = text.strip().strip("'\"").strip()
    t = t.removeprefix("$").removesuffix("%").strip()
    if t.startswith("-$"):
        t = "-" + t[2:]
    t = t.rstrip(".") if t.count(".") == 1 and t.endswith(".") else t
    if not t or not _NUMBER.match(t) or not any(ch.isdigit() for ch in t):
        return None
    value = float(t.replace(",", ""))
    return value if math.isfinite(value) else None


def reference(answer: str) -> float:
    """The number after GSM8K's "####"."""
    _, sep, final = answer.rpartition("####")
    value = parse_number(final) if sep else None
    if value is None:
        raise ValueError(f"A GSM8K answer without a number after '####': {answer[-80:]!r}")
    return value


def answer_of(result: Result) -> float | None:
    """The number the program returned (its last tagged line), or None."""
    lines = [line for line in result.stdout.splitlines() if line.startswith(ANSWER_TAG + " ")]
    return parse_number(lines[-1][len(ANSWER_TAG) + 1:]) if lines and result.passed else None


def same(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def prompt(question: str) -> str:
    body = question.strip().replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    body = "\n    ".join(body.splitlines())
    return f'def solution():\n    """{body}\n    Return the answer as a number."""\n'


def program(question: str, completion: str) -> str:
    return f"{prompt(question)}{completion}\n\nprint({ANSWER_TAG!r}, repr(solution()))\n"


def problems(data_dir: str | None, limit: int | None = None) -> list[Problem]:
    records = read_jsonl_or_hf("gsm8k", data_dir, HF_DATASET, required=("question", "answer"))[:limit]
    refs = [reference(r["answer"]) for r in records]  # a malformed answer is an error before any generation
    return [Problem(f"GSM8K/{n}", prompt(r["question"]), STOP, lambda c, q=r["question"]: program(q, c),
                    lambda result, ref=ref: same(answer_of(result), ref))
            for n, (r, ref) in enumerate(zip(records, refs, strict=True))]
