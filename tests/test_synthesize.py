"""tools.synthesize against a real OpenAI-compatible server on 127.0.0.1 (tests/teacher_server.py): the plan, retries
through 429 / 500 / dropped connections, a SIGKILL mid-run and a resume with every item exactly once, the failure
budget, and the pieces (template, Retry-After, the journal's torn-line repair)."""

from __future__ import annotations

import email.utils
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datagen_helpers import read_jsonl
from runs import ROOT, clean_env
from teacher_server import Server

from phi_jax.datagen.journal import Journal
from phi_jax.datagen.plan import Plan, Snippets, read_topics
from phi_jax.datagen.teacher import RetryPolicy, parse_retry_after
from phi_jax.datagen.template import load_template

TOPICS = [f"topic number {i}" for i in range(12)]  # x 12 textbook variable combinations = 144 items


def synth_cmd(topics: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tools.synthesize", f"--topics={topics}", f"--out={out}", "--model=teacher",
            "--max_tokens=150", *flags]


def output_ids(out: Path) -> list[str]:
    """The ids of the whole records on disk: a SIGKILL can land inside a batch's write, leaving a torn last line
    (no newline) that the journal cuts when the run starts again."""
    files = [*out.glob("part-*.jsonl"), *out.glob("incomplete/part-*.jsonl")]
    whole = [line for f in files for line in f.read_text().split("\n")[:-1] if line.strip()]
    return [json.loads(line)["id"] for line in whole]


@pytest.fixture
def topics(tmp_path) -> Path:
    path = tmp_path / "topics.txt"
    path.write_text("# seeds\n" + "\n".join(TOPICS) + "\n\n")
    return path


def test_plan_ids_are_deterministic_and_tasks_partition_the_plan(topics, tmp_path):
    template = load_template("textbook")
    whole = Plan(template, read_topics(topics), samples=2, seed=3)
    assert whole.size == 12 * 12 * 2 == len(set(whole.item_ids()))
    assert list(whole.item_ids()) == [i.id for i in Plan(template, read_topics(topics), samples=2, seed=3).items()]
    parts = [list(Plan(template, read_topics(topics), samples=2, seed=3, num_tasks=3, task_index=t).item_ids())
             for t in range(3)]
    assert sorted(i for part in parts for i in part) == sorted(whole.item_ids())
    assert not set(whole.item_ids()) & set(Plan(template, read_topics(topics), samples=2, seed=4).item_ids())
    # a snippet is drawn per item from its id, so the same item always gets the same one
    snippets = tmp_path / "web.jsonl"
    snippets.write_text("".join(json.dumps({"id": f"w{i}", "text": f"web page {i} " * 50}) + "\n" for i in range(7)))
    with_snippets = Plan(template, read_topics(topics), snippets=Snippets.read(snippets, max_chars=40))
    items = list(with_snippets.items())
    assert {i.snippet_id for i in items} == {f"w{i}" for i in range(7)}
    assert all(f"web page {i.snippet_id[1:]} " in i.prompt and "<excerpt>" in i.prompt for i in items)
    assert [i.snippet_id for i in items] == [i.snippet_id for i in with_snippets.items()]


def test_template_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('prompt = "About {topic} for {reader}."\n[variables]\naudience = ["kids"]\n')
    with pytest.raises(ValueError, match=r"uses \['reader'\]"):
        Plan(load_template(str(bad)), [{"topic": "x"}])
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped template"):
        load_template("no-such-template")


def test_retry_after_and_backoff():
    assert parse_retry_after({"retry-after": "0.2"}) == 0.2
    assert parse_retry_after({"retry-after-ms": "150", "retry-after": "9"}) == 0.15
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= parse_retry_after({"retry-after": date}) <= 30
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "soon"}) is None
    policy = RetryPolicy(initial=1.0, maximum=8.0)
    import random

    rng = random.Random(0)
    waits = [policy.backoff(n, rng, None) for n in range(10) for _ in range(50)]
    assert min(waits) >= 0 and max(waits) <= 8.0
    assert min(policy.backoff(0, rng, 5.0) for _ in range(50)) >= 5.0  # never sooner than Retry-After


def test_journal_cuts_a_torn_line_and_resumes(tmp_path):
    with Journal(tmp_path, {"a": "a.jsonl"}, "t") as j:
        j.add("a", {"id": "x1", "text": "one"})
        j.add("a", {"id": "x2", "text": "two"})
    path = tmp_path / "a.jsonl"
    path.write_bytes(path.read_bytes() + b'{"id": "x3", "text": "thr')  # a write a SIGKILL interrupted
    with Journal(tmp_path, {"a": "a.jsonl"}, "t") as j:
        assert j.done == {"x1", "x2"} and j.resumed == 2
        with pytest.raises(FileExistsError, match="Another process"):
            Journal(tmp_path, {"a": "a.jsonl"}, "t")
        j.add("a", {"id": "x3", "text": "three"})
    assert [r["id"] for r in read_jsonl(path)] == ["x1", "x2", "x3"]


def test_faults_and_a_sigkill_end_with_every_item_exactly_once(topics, tmp_path):
    """30% of requests get 429 (Retry-After 0.2 s), 500 or a dropped connection; the generator is SIGKILLed once
    some records are on disk and run again: the output holds every planned id once, and the retries are counted."""
    out = tmp_path / "out"
    plan = Plan(load_template("textbook"), read_topics(topics))
    flags = ["--concurrency=8", "--backoff_initial=0.05", "--backoff_max=0.5", "--max_retries=20"]
    with Server(fault_rate=0.3, retry_after=0.2, latency=0.05) as server:
        cmd = synth_cmd(topics, out, f"--base_url={server.base_url}", *flags)
        first = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        part = out / "part-00000-of-00001.jsonl"
        deadline = time.monotonic() + 120
        while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        killed_with = len(output_ids(out))
        assert 0 < killed_with < plan.size, "the kill must land mid-run"
        done = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=180)
        stats = server.stats()
    assert done.returncode == 0, done.stderr[-3000:]
    ids = output_ids(out)
    assert len(ids) == len(set(ids)) == plan.size and set(ids) == set(plan.item_ids())
    summary = json.loads((out / "summary-00000-of-00001.json").read_text())
    assert summary["resumed"] == killed_with and summary["completed"] == plan.size - killed_with
    assert summary["failed"] == 0 and summary["stopped"] is None
    for kind in ("429", "5xx", "connection"):  # each fault mode was met and retried
        assert summary["retries"].get(kind, 0) > 0, summary["retries"]
    assert "timeout" not in summary["retries"]  # nothing took longer than --request_timeout
    assert stats["429"] + stats["500"] + stats["dropped"] > 0.15 * stats["requests"]
    assert stats["min_wait_after_429"] >= 0.2  # Retry-After honoured
    truncated = read_jsonl(out / "incomplete" / "part-00000-of-00001.jsonl")
    assert truncated and all(r["finish_reason"] == "length" for r in truncated) == (summary["truncated"] ==
                                                                                      len(truncated))
    record = read_jsonl(out / "part-00000-of-00001.jsonl")[0]
    assert record["finish_reason"] == "stop" and record["model"] == "teacher"
    assert record["sampling"]["max_tokens"] == 150
    assert record["template_sha256"] == plan.template.sha256 and record["completion_tokens"] > 0
    assert "retries: 429" in done.stdout and "truncated (finish_reason length) in all" in done.stdout


def test_failure_budget_stops_the_run_with_a_summary(topics, tmp_path, capsys):
    from tools.synthesize import main

    with Server(fault_rate=1.0) as server, pytest.raises(SystemExit) as exit_:
        main(synth_cmd(topics, tmp_path / "out", f"--base_url={server.base_url}", "--concurrency=2",
                       "--max_retries=1", "--backoff_initial=0.01", "--max_failures=3")[3:])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "STOPPED: 4 items failed for good, over the budget --max_failures=3" in out
    summary = json.loads((tmp_path / "out" / "summary-00000-of-00001.json").read_text())
    assert summary["failed"] == 4 and summary["completed"] == 0 and sum(summary["retries"].values()) >= 4


def test_dry_run_prints_prompts_and_the_plan_size(topics, tmp_path, capsys):
    from tools.synthesize import main

    main(synth_cmd(topics, tmp_path / "out", "--dry_run", "--show=2", "--template=exercises")[3:])
    out = capsys.readouterr().out
    assert "plan: 12 topics x 4 variable combinations x 1 samples = 48 items" in out
    assert out.count("--- item ") == 2 and 'exercise about "topic number 0"' in out
    assert not (tmp_path / "out").exists()
