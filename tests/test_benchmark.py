"""`python -m phi_jax.benchmark`: the suite's lm-eval tasks exist, and a trained tiny model runs the whole suite
end to end on locally made data (custom lm-eval task YAMLs over local JSON files: nothing is downloaded),
producing results.json, the table and the PNG; a second run gives the same scores."""

import json
import subprocess
import sys

import pytest
from runs import ROOT, clean_env, make_shards, tiny_config

from phi_jax.benchmark import BUNDLED_TASKS, CODE, LM_EVAL, SUITES, task_manager

MBPP = [
    {"task_id": 1, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b\n",
     "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"], "test_setup_code": ""},
    {"task_id": 2, "text": "Write a function to reverse a string.", "code": "def rev(s):\n    return s[::-1]\n",
     "test_list": ["assert rev('ab') == 'ba'", "assert rev('') == ''", "assert rev('abc') == 'cba'"],
     "test_setup_code": ""},
]
GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A book costs $1,200 and a pen $5. What do both cost?", "answer": "1200 + 5 = 1205\n#### 1,205"},
]


def _mc_task(directory, name, n, few_shot_split=False):
    """A multiple-choice lm-eval task NAME over n local documents."""
    docs = [{"question": f"{name} question {i}: what follows {i}?", "choices": [str(i + 1), "def", "x"],
             "answer": i % 3} for i in range(n)]
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    fewshot = "fewshot_split: test\n" if few_shot_split else ""
    (directory / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / f"{name}.jsonl"}
test_split: test
{fewshot}output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
""")


def _local_tasks(directory):
    """Local stand-ins for every lm-eval task of the suite; phi15_squad is the bundled task over local data."""
    for b in SUITES["phi15_report"]:
        if b.kind == LM_EVAL and b.task != "phi15_squad":
            _mc_task(directory, b.task, 6, few_shot_split=b.num_fewshot > 0)
    squad = [{"id": str(i), "title": "Python", "context": f"Python {i} was released in year {2000 + i}.",
              "question": f"When was Python {i} released?", "answers": {"text": [str(2000 + i)], "answer_start": [0]}}
             for i in range(4)]
    (directory / "squad.jsonl").write_text("".join(json.dumps(d) + "\n" for d in squad))
    (directory / "phi15_squad.yaml").write_text(f"""include: {BUNDLED_TASKS / "phi15_squad.yaml"}
task: phi15_squad
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {directory / "squad.jsonl"}
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 3 steps on stdlib shards: a workdir whose checkpoint records its tokenizer."""
    from phi_jax.train import train

    root = tmp_path_factory.mktemp("bench")
    shards = make_shards(root / "data")
    train(tiny_config(shards, total_steps=3, eval_every=0, checkpoint_every=3), root / "run")
    return root / "run"


def test_every_lm_eval_task_of_the_suite_is_in_the_installed_registry():
    """Each task is found in the installed lm-eval's own directory that the suite names (the benchmark indexes only
    those); the slow variant checks the whole registry resolves each name to the same file."""
    tm = task_manager(SUITES["phi15_report"])
    names = [b.task for b in SUITES["phi15_report"] if b.kind == LM_EVAL]
    assert [n for n in names if n not in tm.all_tasks] == []
    assert {b.task for b in SUITES["phi15_report"] if b.kind == CODE} == {"gsm8k", "humaneval", "mbpp"}


@pytest.mark.slow
def test_the_whole_lm_eval_registry_resolves_the_suites_names_to_the_same_files():
    from lm_eval.tasks import TaskManager

    full, suite = TaskManager(include_path=str(BUNDLED_TASKS)), task_manager(SUITES["phi15_report"])
    for b in SUITES["phi15_report"]:
        if b.kind == LM_EVAL:
            assert full.task_index[b.task].yaml_path == suite.task_index[b.task].yaml_path, b.task


def test_the_suite_end_to_end_on_local_data(trained, tmp_path):
    tasks, data, out = tmp_path / "tasks", tmp_path / "data", tmp_path / "out"
    tasks.mkdir(), data.mkdir()
    _local_tasks(tasks)
    (data / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MBPP))
    (data / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    flags = [f"--model={trained}", f"--include_path={tasks}", f"--data_dir={data}", "--limit=3",
             "--max_new_tokens=24", "--batch_size=4", "--timeout=5"]
    env = clean_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    r = subprocess.run([sys.executable, "-m", "phi_jax.benchmark", *flags, f"--out={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((out / "results.json").read_text())
    by_name = {x["name"]: x for x in report["results"]}
    assert list(by_name) == [b.name for b in SUITES["phi15_report"]]
    assert all(x["status"] == "ok" for x in report["results"]), [x.get("reason") for x in report["results"]]
    for x in report["results"]:
        assert 0.0 <= x["value"] <= 1.0 and x["n"] == (2 if x["name"] in ("mbpp", "gsm8k") else 3), x
    assert by_name["humaneval"]["report"] == {"phi-1.5": 0.341, "phi-1.5-web": 0.414}
    assert report["model"]["step"] == 3 and len(report["model"]["config_sha256"]) == 64
    assert report["model"]["tokenizer"].endswith(".model") and len(report["model"]["tokenizer_sha256"]) == 64
    assert report["sandbox"]["mode"] == "process" and report["versions"]["lm_eval"] == "0.4.13"
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").read_text().strip() in r.stdout
    samples = [json.loads(line) for line in (out / "samples" / "humaneval.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]

    # The same command gives the same greedy scores (here on two benchmarks, in this process).
    from phi_jax.benchmark import main

    again = tmp_path / "again"
    main([*flags, f"--out={again}", "--tasks=humaneval,mmlu,squad"])
    repeat = {x["name"]: x["value"] for x in json.loads((again / "results.json").read_text())["results"]}
    assert repeat == {k: by_name[k]["value"] for k in ("humaneval", "mmlu", "squad")}
    again_samples = [json.loads(line) for line in (again / "samples" / "humaneval.jsonl").read_text().splitlines()]
    assert [s["completion"] for s in again_samples] == [s["completion"] for s in samples]


def test_missing_data_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """Offline, with no cache: lm-eval's hellaswag and the MBPP data are skipped, each with what to provide."""
    from types import SimpleNamespace

    from phi_jax.benchmark import PHI15_REPORT, run
    from phi_jax.config import PhiConfig
    from phi_jax.model import init_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    args = SimpleNamespace(suite="phi15_report", batch_size=2, include_path=[], limit=2, seed=0, data_dir=None,
                           temperature=0.0, top_p=1.0, timeout=5.0, workers=1, sandbox="process", num_samples=1,
                           max_new_tokens=8, generator="engine")
    model = init_model(PhiConfig.preset("tiny", max_position_embeddings=64), seed=0)

    class Tok:
        eos_id = 2

        def encode(self, text):
            return [3 + b % 200 for b in text.encode()]

        def decode(self, ids):
            return ""

    chosen = [b for b in PHI15_REPORT if b.name in ("hellaswag", "mbpp")]
    report = run(chosen, model, Tok(), args, identity={"model": "tiny"})
    hellaswag, mbpp = report["results"]
    assert hellaswag["status"] == "skipped" and "lm-eval's hellaswag needs its dataset" in hellaswag["reason"]
    assert mbpp["status"] == "skipped" and "pass --data_dir=DIR holding mbpp.jsonl" in mbpp["reason"]
    assert "Skipped:" in report["table"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--num_samples=4"], "--num_samples=4 with --temperature=0 repeats one greedy completion"),
    (["--tasks=humaneval,nope"], "--tasks: ['nope'] not in the suite"),
    (["--limit=0"], "--limit=0 must be >= 1"),
    (["--sandbox=off"], "invalid choice: 'off'"),
    (["--generator=vllm"], "invalid choice: 'vllm'"),
])
def test_bad_flags_are_one_line_errors_before_loading(flags, message, capsys):
    from phi_jax.benchmark import main

    with pytest.raises(SystemExit):
        main(["--model=/does/not/exist", "--out=/tmp/unused", *flags])
    assert message in capsys.readouterr().err
