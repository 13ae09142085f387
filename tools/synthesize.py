"""Synthetic textbooks from topic seeds, through any OpenAI-compatible endpoint (phi-1.5's synthetic data).

    export OPENAI_API_KEY=...        # any endpoint's key (a local server may need none)
    python -m tools.synthesize --topics=topics.txt --template=textbook --snippets=web.jsonl \\
        --base_url=https://api.openai.com/v1 --model=gpt-4o-mini --out=data/textbooks --concurrency=256
    python -m tools.synthesize ... --dry_run            # a few rendered prompts and the plan's size, no requests

Topics x the template's variable combinations x --samples make the plan; every item has a fixed id, so a killed
run resumes with the same command and ends with every item exactly once. Across machines, give each a
--task_index of --num_tasks (same --out on a shared filesystem, or merge the part files). Templates:
phi_jax/datagen/templates/ ("textbook", "exercises") or a TOML file of your own (phi_jax/datagen/template.py).
Then: python -m tools.prepare_data --source=jsonl --jsonl='OUT/part-*.jsonl' --tokenizer=TOK --out=DATA/textbooks
"""

import argparse
import sys

from phi_jax.datagen.plan import Plan, Snippets, read_topics
from phi_jax.datagen.runner import Prices
from phi_jax.datagen.synthesize import dry_run, summary_text, synthesize
from phi_jax.datagen.teacher import RetryPolicy
from phi_jax.datagen.template import load_template


def add_teacher_args(p: argparse.ArgumentParser) -> None:
    """The flags of a teacher endpoint and of running many requests (shared with tools.quality_filter annotate)."""
    g = p.add_argument_group("teacher")
    g.add_argument("--base_url", help="the OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", help="the endpoint's model name")
    g.add_argument("--api", choices=["chat", "completions"], default="chat", help="/chat/completions or /completions")
    g.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the key")
    g.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    g.add_argument("--request_timeout", type=float, default=120.0, help="seconds before a request is retried")
    g.add_argument("--max_retries", type=int, default=8, help="retries of one request (429, 5xx, timeouts, drops)")
    g.add_argument("--backoff_initial", type=float, default=1.0, help="seconds: the first retry's wait bound")
    g.add_argument("--backoff_max", type=float, default=60.0, help="seconds: the longest backoff")
    g.add_argument("--max_failures", type=int, default=100,
                   help="items that may fail for good before the run stops (they are retried by the next run)")
    g.add_argument("--price_input_per_mtok", type=float, default=0.0, help="USD per million prompt tokens")
    g.add_argument("--price_output_per_mtok", type=float, default=0.0, help="USD per million completion tokens")
    g.add_argument("--progress_every", type=float, default=30.0,
                   help="seconds between progress lines when stderr is not a terminal")
    g.add_argument("--num_tasks", type=int, default=1, help="machines sharing the work")
    g.add_argument("--task_index", type=int, default=0, help="this machine's task, in [0, num_tasks)")


def check_teacher_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if not a.base_url or not a.model:
        p.error("--base_url and --model are required (except with --dry_run)")
    if a.max_retries < 0 or a.max_failures < 0:
        p.error(f"--max_retries={a.max_retries} and --max_failures={a.max_failures} must be >= 0")


def retry_policy(a: argparse.Namespace) -> RetryPolicy:
    return RetryPolicy(max_retries=a.max_retries, initial=a.backoff_initial, maximum=a.backoff_max)


def main(argv=None) -> None:
    import os

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topics", required=True, help="one topic per line, or JSONL objects with a 'topic' field")
    p.add_argument("--template", default="textbook", help="a shipped template (textbook, exercises) or a TOML file")
    p.add_argument("--snippets", default=None, help="JSONL of web samples, one drawn per item for diversity")
    p.add_argument("--snippet_text_field", default="text")
    p.add_argument("--snippet_max_chars", type=int, default=1000, help="a snippet is cut to this many characters")
    p.add_argument("--samples", type=int, default=1, help="items per topic and variable combination")
    p.add_argument("--seed", type=int, default=0, help="part of every item id; another seed is another plan")
    p.add_argument("--out", required=True, help="output directory (resumed if it holds this plan's output)")
    p.add_argument("--limit", type=int, default=0, help="only the first N items of this task (0 = all)")
    p.add_argument("--temperature", type=float, default=None, help="default: the template's")
    p.add_argument("--top_p", type=float, default=None, help="default: the template's")
    p.add_argument("--max_tokens", type=int, default=None, help="default: the template's")
    p.add_argument("--dry_run", action="store_true", help="print a few rendered prompts and the plan's size")
    p.add_argument("--show", type=int, default=3, help="prompts --dry_run prints")
    add_teacher_args(p)
    a = p.parse_args(argv)
    snippets = Snippets.read(a.snippets, a.snippet_text_field, max_chars=a.snippet_max_chars) if a.snippets else None
    plan = Plan(load_template(a.template), read_topics(a.topics), samples=a.samples, seed=a.seed, snippets=snippets,
                num_tasks=a.num_tasks, task_index=a.task_index)
    if a.dry_run:
        print(dry_run(plan, a.show))
        return
    check_teacher_args(p, a)
    summary = synthesize(plan, a.out, base_url=a.base_url, model=a.model, api=a.api,
                         sampling={"temperature": a.temperature, "top_p": a.top_p, "max_tokens": a.max_tokens},
                         concurrency=a.concurrency, request_timeout=a.request_timeout, max_failures=a.max_failures,
                         retry=retry_policy(a), prices=Prices(a.price_input_per_mtok, a.price_output_per_mtok),
                         limit=a.limit, api_key=os.environ.get(a.api_key_env), progress_every=a.progress_every)
    print(summary_text(summary))
    if summary["stopped"]:
        sys.exit(1)


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
