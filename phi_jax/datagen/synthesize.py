"""Synthetic textbooks from topic seeds (phi-1.5 technical report, section 2.2): a plan's items sent to a teacher.

Output directory (one set of files per task, so tasks on several machines can share it):
    plan.json                              what the plan is made of; a resume with another plan is refused
    part-TTTTT-of-NNNNN.jsonl              complete records (finish_reason "stop"): python -m tools.prepare_data
                                           --source=jsonl reads their "text" field
    incomplete/part-TTTTT-of-NNNNN.jsonl   truncated (finish_reason "length") and other unfinished completions
    summary-TTTTT-of-NNNNN.json            the last run's summary
Each record: id, text, topic (and the topics file's other fields), variables, sample, seed, template,
template_sha256, snippet_id, model, sampling, finish_reason, prompt_tokens, completion_tokens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

from phi_jax.datagen.journal import Journal, write_json
from phi_jax.datagen.plan import Item, Plan
from phi_jax.datagen.runner import Job, Prices, format_summary, run_jobs
from phi_jax.datagen.teacher import Completion, Teacher


def task_name(task_index: int, num_tasks: int) -> str:
    return f"{task_index:05d}-of-{num_tasks:05d}"


def check_plan(out: Path, description: dict) -> None:
    """Records the plan in out/plan.json, or checks that it is the recorded one."""
    path = out / "plan.json"
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != description:
            diff = sorted(k for k in set(recorded) | set(description) if recorded.get(k) != description.get(k))
            raise ValueError(f"{out} holds the output of another plan (it differs in {diff}: recorded "
                             f"{ {k: recorded.get(k) for k in diff} }, now { {k: description.get(k) for k in diff} }). "
                             "Use a new --out, or the same settings to resume.")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, description)


def dry_run(plan: Plan, show: int = 3) -> str:
    """A few rendered prompts and the plan's size, without any request."""
    lines = [f"plan: {len(plan.topics)} topics x {len(plan.combinations)} variable combinations x {plan.samples} "
             f"samples = {plan.size} items; this task ({plan.task_index} of {plan.num_tasks}): {plan.task_size}",
             f"template {plan.template.name} ({plan.template.path}, sha256 {plan.template.sha256[:12]})"]
    prompt_chars = 0
    for n, item in enumerate(plan.items()):
        prompt_chars += len(item.prompt) + len(item.system or "")
        if n < show:
            lines += [f"--- item {item.id} (topic {item.topic['topic']!r}, {item.variables}, sample {item.sample}"
                      f"{', snippet ' + item.snippet_id if item.snippet_id else ''})"]
            if item.system:
                lines += [f"[system] {item.system}"]
            lines += [item.prompt]
    lines.append(f"--- prompts of this task: {prompt_chars} characters in all (about {prompt_chars // 4} tokens)")
    return "\n".join(lines)


def _record(item: Item, c: Completion, plan: Plan, model: str, sampling: dict) -> dict:
    return {"id": item.id, "text": c.text, "topic": item.topic["topic"],
            **{k: v for k, v in item.topic.items() if k != "topic"}, "variables": item.variables,
            "sample": item.sample, "seed": plan.seed, "template": plan.template.name,
            "template_sha256": plan.template.sha256, "snippet_id": item.snippet_id, "model": model,
            "sampling": sampling, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens}


def synthesize(plan: Plan, out: str | Path, *, base_url: str, model: str, api: str = "chat",
               sampling: dict | None = None, concurrency: int = 64, request_timeout: float = 120.0,
               max_failures: int = 100, retry=None, prices: Prices | None = None, limit: int = 0,
               api_key: str | None = None, progress_every: float = 30.0) -> dict:
    """Runs this task's share of the plan (the items not yet in `out`) and returns the summary (also written)."""
    from phi_jax.datagen.teacher import RetryPolicy

    out = Path(out)
    check_plan(out, plan.describe())
    sampling = {**plan.template.sampling, **{k: v for k, v in (sampling or {}).items() if v is not None}}
    name = task_name(plan.task_index, plan.num_tasks)
    journal = Journal(out, {"complete": f"part-{name}.jsonl", "incomplete": f"incomplete/part-{name}.jsonl"}, name)
    try:
        total = plan.task_size if not limit else min(limit, plan.task_size)

        def jobs() -> Iterator[Job]:
            for n, item in enumerate(plan.items()):
                if limit and n >= limit:
                    return
                if item.id not in journal.done:
                    yield Job(item.id, item.system, item.prompt, item)

        pending = total - sum(1 for i in _first(plan, limit) if i in journal.done)

        def to_record(job: Job, c: Completion) -> tuple[str, dict]:
            stream = "complete" if c.finish_reason == "stop" and c.text.strip() else "incomplete"
            return stream, _record(job.meta, c, plan, model, sampling)

        teacher = Teacher(base_url, model, api=api, timeout=request_timeout, concurrency=concurrency,
                          retry=retry or RetryPolicy(), sampling=sampling, api_key=api_key, seed=plan.seed)
        summary = asyncio.run(run_jobs(jobs(), pending, teacher, journal, to_record, concurrency=concurrency,
                                       max_failures=max_failures, desc=f"synthesize task {name}",
                                       prices=prices or Prices(), progress_every=progress_every))
    finally:
        journal.close()
    summary["task"] = name
    summary["output"] = {"complete": str(journal.paths["complete"]), "incomplete": str(journal.paths["incomplete"])}
    summary["truncated"] = _count_truncated(journal.paths["incomplete"])
    write_json(out / f"summary-{name}.json", summary)
    return summary


def _first(plan: Plan, limit: int) -> Iterator[str]:
    for n, item_id in enumerate(plan.item_ids()):
        if limit and n >= limit:
            return
        yield item_id


def _count_truncated(path: Path) -> int:
    """Records in the incomplete stream cut at max_tokens (finish_reason "length")."""
    return sum(1 for line in path.open(encoding="utf-8") if '"finish_reason": "length"' in line)


def summary_text(summary: dict) -> str:
    text = format_summary(summary)
    return (f"{text}\n  truncated (finish_reason length) in all: {summary['truncated']}, kept apart in "
            f"{summary['output']['incomplete']}\n  output: {summary['output']['complete']}")
