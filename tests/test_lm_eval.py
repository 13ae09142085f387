"""The lm-eval adapter: a local multiple-choice task through the harness equals scoring the choices directly."""

import json
import subprocess
import sys

import numpy as np
import pytest

from phi_jax.config import PhiConfig
from phi_jax.evaluate import evaluate_tokens
from phi_jax.model import init_model
from tests.byte_tokenizer import EOS, ByteTokenizer


@pytest.fixture(scope="module")
def model():
    return init_model(PhiConfig.preset("tiny", max_position_embeddings=64), seed=1)


def _log_softmax(logits):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _direct_loglik(model, tok, context, continuation):
    ids = tok.encode(context + continuation)
    n = len(tok.encode(continuation))
    logp = _log_softmax(np.asarray(model(np.asarray([ids[:-1]], np.int32))[0])[0])
    return float(sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1 - n, len(ids) - 1)))


def write_mc_task(tmp_path) -> list[dict]:
    """A 12-question multiple-choice task `tiny_mc` in tmp_path (lm-eval's include_path); returns its documents."""
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "tree", "river", "blue", "seven", "python", "stone"]
    docs = [{"question": f"Q{i}: which word comes next after {words[i % 8]}?",
             "choices": [str(w) for w in rng.choice(words, 3, replace=False)], "answer": int(rng.integers(3))}
            for i in range(12)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return docs


def test_multiple_choice_accuracy_matches_direct_scoring(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from phi_jax.lm_eval_adapter import PhiJaxLM

    docs = write_mc_task(tmp_path)
    tok = ByteTokenizer()
    lm = PhiJaxLM(model=model, tokenizer=tok, batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    acc = out["results"]["tiny_mc"]["acc,none"]
    expected = np.mean([int(np.argmax([_direct_loglik(model, tok, d["question"], " " + c) for c in d["choices"]]))
                        == d["answer"] for d in docs])
    assert acc == pytest.approx(expected)


def test_loglikelihood_rolling_equals_direct_sum(model):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows

    from phi_jax.lm_eval_adapter import PhiJaxLM

    tok = ByteTokenizer()
    lm = PhiJaxLM(model=model, tokenizer=tok, batch_size=2)
    texts = ["short text", "def f(x):\n\treturn x * 2  # a line longer than the 64-token context " * 3]
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in texts]
    got = lm.loglikelihood_rolling(reqs)
    for text, value in zip(texts, got, strict=True):
        # lm-eval's windows: the first conditions on EOS; later ones on the tokens before them, up to the context.
        direct = 0.0
        for inputs, preds in get_rolling_token_windows(tok.encode(text), EOS, 64, context_len=1):
            logp = _log_softmax(np.asarray(model(np.asarray([inputs], np.int32))[0])[0])
            direct += sum(logp[len(inputs) - len(preds) + j, t] for j, t in enumerate(preds))
        assert value == pytest.approx(direct, rel=1e-5, abs=1e-4)
    # A text that fits one window also equals evaluate.py's summed log-likelihood.
    direct = -evaluate_tokens(model, np.asarray([EOS, *tok.encode(texts[0])]), seq_len=64, batch_size=2)["nll"]
    assert got[0] == pytest.approx(direct, rel=1e-5, abs=1e-4)


def test_loglikelihood_truncates_long_contexts_and_greedy_flag(model):
    from lm_eval.api.instance import Instance

    from phi_jax.lm_eval_adapter import PhiJaxLM

    tok = ByteTokenizer()
    lm = PhiJaxLM(model=model, tokenizer=tok, batch_size=4)
    long_ctx = "x" * 200
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(long_ctx, "yz"), idx=0)]
    (logp, _), = lm.loglikelihood(reqs)
    assert logp == pytest.approx(_direct_loglik(model, tok, "x" * 62, "yz"), abs=1e-4)


def test_cli_as_the_readme_runs_it(model, tmp_path):
    """`python -m phi_jax.lm_eval_adapter --model_args path=DIR,batch_size=4 --tasks T`: lm-eval's CLI passes its own
    batch_size too; model_args must win, and the accuracy must equal the same model scored in this process."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from runs import ROOT, clean_env, documents

    from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece
    from phi_jax.hf import save_pretrained
    from phi_jax.lm_eval_adapter import PhiJaxLM

    (tmp_path / "tasks").mkdir()
    write_mc_task(tmp_path / "tasks")
    sp = train_sentencepiece(documents(5), tmp_path / "sp", vocab_size=512)
    save_pretrained(model, tmp_path / "hf")
    env = clean_env(HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    r = subprocess.run([sys.executable, "-m", "phi_jax.lm_eval_adapter", "--model_args",
                        f"path={tmp_path / 'hf'},tokenizer={sp},batch_size=4", "--tasks", "tiny_mc",
                        "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cli_acc = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())["results"]["tiny_mc"]["acc,none"]
    lm = PhiJaxLM(model=model, tokenizer=load_tokenizer(sp), batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    assert cli_acc == pytest.approx(out["results"]["tiny_mc"]["acc,none"])


def test_generate_until_is_the_samplers_greedy_text_cut_at_the_stop():
    from lm_eval.api.instance import Instance

    from phi_jax.generate import Sampler
    from phi_jax.lm_eval_adapter import PhiJaxLM

    tok = ByteTokenizer()
    lm = PhiJaxLM(model=init_model(PhiConfig.preset("tiny", max_position_embeddings=64), seed=1), tokenizer=tok)
    prompts = ["def f(x):", "a"]
    expected = [tok.decode([t for t in ids if t != EOS]) for ids in Sampler(
        init_model(PhiConfig.preset("tiny", max_position_embeddings=64), seed=1))(
            [tok.encode(p) for p in prompts], max_new_tokens=12, eos_id=EOS)]
    stop = expected[0][3:5]  # a stop sequence inside the first completion
    reqs = [Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=(p, {"until": [stop], "max_gen_toks": 12})) for p in prompts]
    got = lm.generate_until(reqs)
    assert got[0] == expected[0][:expected[0].index(stop)]
    assert got[1] == (expected[1][:expected[1].index(stop)] if stop in expected[1] else expected[1])
