"""Teacher annotation of a random sample of a corpus, phi-1's first step (Gunasekar et al. 2023, section 2.1).

phi-1 asked GPT-4 to "determine its educational value for a student whose goal is to learn basic coding concepts"
for about 100k files, then trained a classifier on those labels. PROMPT below asks for that judgement as a score
from 0 to 10 on the answer's last line ("Score: N"); `parse_score` reads it. An answer without a readable score is
counted and kept apart (not retried: the same prompt would likely get the same answer).

Output directory (per task, exactly-once like tools.synthesize):
    labels-TTTTT-of-NNNNN.jsonl              {"id", "score", "text", "answer", "model", "prompt_sha256", ...}
    unparseable/labels-TTTTT-of-NNNNN.jsonl  answers with no readable score
Labels may instead come from a user's JSONL file with "text" and "label" (0/1) or "score" fields (classifier.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

from phi_jax.datagen.documents import read_documents, sample_documents
from phi_jax.datagen.journal import Journal, write_json
from phi_jax.datagen.runner import Job, Prices, run_jobs
from phi_jax.datagen.synthesize import check_plan, task_name
from phi_jax.datagen.teacher import Completion, RetryPolicy, Teacher

PROMPT = """Here is a document from a training corpus for a language model.

<document>
{document}
</document>

Determine its educational value for a student whose goal is to learn basic coding concepts. A document of high
educational value is clear, self-contained, correct and instructive (it explains ideas, shows how code works, or
teaches a concept step by step); one of low value is boilerplate, configuration, data, unexplained or broken code,
or text with little to learn from. Think briefly, then give your rating on the last line exactly as
"Score: N", with N an integer from 0 (no educational value) to 10 (excellent textbook quality)."""

_SCORE = re.compile(r"score\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
MAX_SCORE = 10.0


def parse_score(answer: str) -> float | None:
    """The last "Score: N" of an answer, if N is in [0, 10]; else None."""
    found = _SCORE.findall(answer)
    if not found:
        return None
    score = float(found[-1])
    return score if 0.0 <= score <= MAX_SCORE else None


def annotate(corpus, out: str | Path, *, sample_size: int, seed: int, base_url: str, model: str,
             api: str = "chat", text_field: str = "text", id_field: str = "id", max_chars: int = 6000,
             prompt: str = PROMPT, max_tokens: int = 256, temperature: float = 0.0, concurrency: int = 64,
             request_timeout: float = 120.0, max_failures: int = 100, retry: RetryPolicy | None = None,
             prices: Prices | None = None, num_tasks: int = 1, task_index: int = 0, api_key: str | None = None,
             progress_every: float = 30.0) -> dict:
    """Scores this task's share of a seeded random sample of the corpus; returns the summary (also written)."""
    if "{document}" not in prompt:
        raise ValueError("The annotation prompt must contain {document}, where the document goes.")
    if sample_size < 1 or max_chars < 1:
        raise ValueError(f"--sample_size={sample_size} and --max_chars={max_chars} must be >= 1.")
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"--task_index={task_index} must be in [0, --num_tasks={num_tasks}).")
    out = Path(out)
    prompt_sha = hashlib.sha256(prompt.encode()).hexdigest()
    sample = sample_documents(read_documents(corpus, text_field, id_field), sample_size, seed)
    check_plan(out, {"kind": "annotate", "sample_size": sample_size, "seed": seed, "prompt_sha256": prompt_sha,
                     "max_chars": max_chars, "num_tasks": num_tasks, "sample_ids_sha256":
                     hashlib.sha256("\n".join(d for d, _, _ in sample).encode()).hexdigest()})
    name = task_name(task_index, num_tasks)
    mine = sample[task_index::num_tasks]
    sampling = {"temperature": temperature, "max_tokens": max_tokens}
    journal = Journal(out, {"labels": f"labels-{name}.jsonl", "unparseable": f"unparseable/labels-{name}.jsonl"},
                      name)
    try:
        jobs = [Job(doc_id, None, prompt.replace("{document}", text[:max_chars]), text)
                for doc_id, text, _ in mine if doc_id not in journal.done]

        def to_record(job: Job, c: Completion) -> tuple[str, dict]:
            score = parse_score(c.text)
            record = {"id": job.id, "score": score, "text": job.meta, "answer": c.text, "model": model,
                      "prompt_sha256": prompt_sha, "finish_reason": c.finish_reason,
                      "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
            return ("labels" if score is not None else "unparseable"), record

        teacher = Teacher(base_url, model, api=api, timeout=request_timeout, concurrency=concurrency,
                          retry=retry or RetryPolicy(), sampling=sampling, api_key=api_key, seed=seed)
        summary = asyncio.run(run_jobs(jobs, len(jobs), teacher, journal, to_record, concurrency=concurrency,
                                       max_failures=max_failures, desc=f"annotate task {name}",
                                       prices=prices or Prices(), progress_every=progress_every))
    finally:
        journal.close()
    summary.update(task=name, sample=len(sample), this_task=len(mine),
                   output={k: str(p) for k, p in journal.paths.items()})
    write_json(out / f"summary-{name}.json", summary)
    return summary
