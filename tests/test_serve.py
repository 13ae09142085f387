"""The OpenAI-compatible server (python -m phi_jax.serve) on 127.0.0.1, as a real process: the `openai` client,
lm-eval's local-completions against the in-process adapter, streams, cancellation by disconnect, a full queue, every
bad input with its status and message, metrics, and SIGTERM's drain. One server for the module; its SIGTERM test
runs last."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests

from tests.hf_reference import make_hf_phi
from tests.runs import ROOT, clean_env, documents

KEY = "test-key"
NAME = "tiny-phi"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random transformers PhiForCausalLM (wide init: peaked logits) with a SentencePiece tokenizer as
    tokenizer.json."""
    from phi_jax.data.tokenizer import train_sentencepiece
    from phi_jax.hf.tokenizer import hf_tokenizer_files

    root = tmp_path_factory.mktemp("serve")
    out = make_hf_phi(root / "model", seed=4, max_position_embeddings=128, initializer_range=0.2)
    sp = train_sentencepiece(documents(5), root / "sp", vocab_size=512)
    for name, text in hf_tokenizer_files(sp, model_max_length=128).items():
        (out / name).write_text(text)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, *flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(model_dir.parent / f"server-{self.port}.log", "w+")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "phi_jax.serve", f"--model={model_dir}", f"--port={self.port}",
             f"--served_model_name={NAME}", "--slots=4", "--chunk=32", "--no-warmup", *flags],
            cwd=ROOT, env=clean_env(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.5)
        raise TimeoutError(self.output())

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def post(self, path, body, key=KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.post(self.url + path, data=body if isinstance(body, (str, bytes)) else json.dumps(body),
                             headers={"Content-Type": "application/json", **headers}, timeout=120, **kw)

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=10).json()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
        self.log.close()


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, f"--api_key={KEY}", "--max_queue=8", "--drain_timeout=30")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' model and phi_jax's reading of the tokenizer: greedy ids and log-softmax of token ids."""
    import torch
    import transformers

    from phi_jax.data.tokenizer import load_tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)

    class Ref:
        def __init__(self):
            self.tok = tok

        def greedy(self, ids, n):
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                                     eos_token_id=tok.eos_id, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            new = out[0, len(ids):].tolist()
            return [t for t in new if t != tok.eos_id]

        def logp(self, ids):
            with torch.no_grad():
                return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()

    return Ref()


def _client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_client(server, reference):
    client = _client(server)
    prompt = "def main(argv):\n"
    ids = reference.tok.encode(prompt)
    want = reference.greedy(ids, 16)
    done = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
    choice = done.choices[0]
    assert choice.text == reference.tok.decode(want)
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == len(want) <= 16
    logp = reference.logp(ids + want)
    np.testing.assert_allclose(choice.logprobs.token_logprobs, [logp[len(ids) - 1 + i, t] for i, t in
                                                                enumerate(want)], atol=1e-4)
    assert all(len(top) <= 2 and max(top.values()) >= lp - 1e-6
               for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs, strict=True))
    # Streaming: the same tokens (and text) in pieces; token ids as the prompt: the same completion.
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                            logprobs=0))
    assert len(chunks) > 1 and chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs] == choice.logprobs.token_logprobs
    if "\ufffd" not in choice.text:  # see engine.Engine._final_text
        assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert client.completions.create(model=NAME, prompt=ids, max_tokens=16, temperature=0).choices[0].text == \
        choice.text
    # n > 1 over two prompts: four choices in order, reproducible with a seed.
    kw = dict(model=NAME, prompt=[prompt, "import os"], n=2, max_tokens=8, temperature=0.8, seed=3)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    # A stop string cuts the text before it.
    stop = choice.text[4:7]
    stopped = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].text == choice.text[:choice.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # Chat: the plain template, continued greedily.
    from phi_jax.serve import CHAT_STOP

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=10, temperature=0)
    template = reference.tok.encode("User: Say hi\nAssistant:")
    text = reference.tok.decode(reference.greedy(template, 10))
    assert chat.choices[0].message.content == text.split(CHAT_STOP)[0]
    assert [m.id for m in client.models.list().data] == [NAME]


def test_raw_stream_format_and_echo(server, reference):
    r = server.post("/v1/completions", {"model": NAME, "prompt": "x = 1", "max_tokens": 5, "temperature": 0,
                                        "stream": True, "echo": True, "logprobs": 1,
                                        "stream_options": {"include_usage": True}}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["text"].startswith("x = 1")  # echo: the prompt comes first
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert chunks[-1]["usage"]["prompt_tokens"] == len(reference.tok.encode("x = 1"))


def test_lm_eval_local_completions_equals_the_in_process_adapter(server, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI  # lm-eval's `local-completions`
    from lm_eval.tasks import TaskManager

    from phi_jax.lm_eval_adapter import PhiJaxLM
    from tests.test_lm_eval import write_mc_task

    write_mc_task(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path))
    client = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model=NAME, tokenizer_backend="huggingface",
                                 tokenizer=str(model_dir), max_length=128, num_concurrent=2, max_retries=1)
    remote = lm_eval.simple_evaluate(model=client, tasks=["tiny_mc"], task_manager=tasks, log_samples=True)
    local = lm_eval.simple_evaluate(model=PhiJaxLM(path=str(model_dir), batch_size=4), tasks=["tiny_mc"],
                                    task_manager=tasks, log_samples=True)
    got = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in remote["samples"]["tiny_mc"]}
    want = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in local["samples"]["tiny_mc"]}
    assert sorted(got) == sorted(want) == list(range(12))
    np.testing.assert_allclose([got[d] for d in sorted(got)], [want[d] for d in sorted(want)], atol=1e-4)


BAD = [
    # (body, status, type or code, message fragment)
    ("{not json", 400, "invalid_request_error", "not valid JSON"),
    ({"model": NAME}, 400, "invalid_request_error", "Invalid parameter prompt: Field required"),
    ({"model": NAME, "prompt": "a", "temperature": -1}, 400, "invalid_request_error",
     "Invalid parameter temperature: Input should be greater than or equal to 0"),
    ({"model": NAME, "prompt": "a", "top_p": 1.5}, 400, "invalid_request_error", "Invalid parameter top_p"),
    ({"model": NAME, "prompt": "a", "n": 0}, 400, "invalid_request_error", "Invalid parameter n"),
    ({"model": NAME, "prompt": "a", "max_tokens": 0}, 400, "invalid_request_error", "max_tokens=0 generates nothing"),
    ({"model": NAME, "prompt": "a", "logprobs": 50}, 400, "invalid_request_error",
     "logprobs=50 must be between 0 and 20"),
    ({"model": NAME, "prompt": [1] * 120, "max_tokens": 16}, 400, "context_length_exceeded",
     "the prompt (120 tokens) plus max_tokens (16) is 136 tokens, more than the model's context of 128 tokens"),
    ({"model": NAME, "prompt": [[5, 600]]}, 400, "invalid_request_error",
     "token id 600 is outside the vocabulary [0, 512)"),
    ({"model": NAME, "prompt": ""}, 400, "invalid_request_error", "A prompt is empty"),
    ({"model": NAME, "prompt": "a", "presence_penalty": 0.5}, 400, "invalid_request_error", "not supported"),
    ({"model": NAME, "prompt": "a", "n": 9}, 400, "invalid_request_error", "more than the queue holds (8"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model_not_found", "The model `gpt-4` does not exist"),
]


@pytest.mark.parametrize("body,status,kind,message", BAD, ids=[f"{b[1]}-{b[3][:30]}" for b in BAD])
def test_bad_input_status_and_message(server, body, status, kind, message):
    r = server.post("/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert kind in (error["type"], error["code"])
    assert message in error["message"]


def test_api_key_is_required_and_checked(server):
    for key in (None, "wrong"):
        r = server.post("/v1/completions", {"model": NAME, "prompt": "a"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(server.url + "/health", timeout=10).status_code == 200  # health and metrics stay open


def test_tokenizer_endpoints(server, reference):
    """vLLM's /tokenize, /detokenize and /tokenizer_info (lm-eval's remote tokenizer reads them)."""
    text = "def main():\n    return 0"
    tokens = requests.post(server.url + "/tokenize", json={"prompt": text}, timeout=10).json()["tokens"]
    assert tokens == reference.tok.encode(text)
    assert requests.post(server.url + "/detokenize", json={"tokens": tokens}, timeout=10).json()["prompt"] == text
    info = requests.get(server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == reference.tok.decode([reference.tok.eos_id]) == "<|endoftext|>"


def test_exposure_warning():
    from phi_jax.serve import exposure_warning

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    assert exposure_warning("::1", None) is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "k") is None


def _metric(server, line_start: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.split(" ")[-1]) for line in text.splitlines() if line.startswith(line_start))


def test_a_disconnected_stream_frees_its_slot(server):
    aborted = _metric(server, 'phi_jax_requests_total{finish_reason="abort"}')
    r = server.post("/v1/completions", {"model": NAME, "prompt": "def f():", "max_tokens": 110, "temperature": 0,
                                        "ignore_eos": True, "stream": True, "n": 2}, stream=True)
    lines = r.iter_lines()
    assert next(line for line in lines if line).startswith(b"data: ")
    r.close()  # the client goes away mid-stream
    deadline = time.time() + 30
    while _metric(server, 'phi_jax_requests_total{finish_reason="abort"}') < aborted + 2 and time.time() < deadline:
        time.sleep(0.05)
    assert _metric(server, 'phi_jax_requests_total{finish_reason="abort"}') == aborted + 2
    health = server.health()
    assert health["live_slots"] == 0 and health["queue_length"] == 0


def test_a_full_queue_answers_429(server):
    """Eight completions for four slots: four decode, four wait. Five more would make nine waiting, over the bound
    of eight (--max_queue): refused with 429, while one more is taken."""
    busy = threading.Thread(target=server.post, args=("/v1/completions", {
        "model": NAME, "prompt": "a", "max_tokens": 120, "ignore_eos": True, "n": 8}))
    busy.start()
    deadline = time.time() + 30
    while (server.health()["live_slots"], server.health()["queue_length"]) != (4, 4) and time.time() < deadline:
        time.sleep(0.01)
    r = server.post("/v1/completions", {"model": NAME, "prompt": "c", "max_tokens": 2, "n": 5})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["message"] == ("The queue is full: 4 requests waiting, at most 8 (--max_queue); retry "
                                            "later.")
    busy.join(120)


def test_metrics(server):
    server.post("/v1/completions", {"model": NAME, "prompt": "def g():", "max_tokens": 4, "temperature": 0})
    text = requests.get(server.url + "/metrics", timeout=10).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    for name in ("phi_jax_queue_length", "phi_jax_live_slots", "phi_jax_generated_tokens_total",
                 "phi_jax_time_to_first_token_seconds_count", "phi_jax_inter_token_latency_seconds_count"):
        assert name in values, name
    assert values["phi_jax_generated_tokens_total"] >= 4 and values["phi_jax_time_to_first_token_seconds_count"] >= 1
    assert values["phi_jax_slots"] == 4


def test_sigterm_drains_then_exits_0(server):
    """Last: SIGTERM mid-stream. The stream runs to its end ([DONE]), no new request is taken, status 0."""
    r = server.post("/v1/completions", {"model": NAME, "prompt": "class A:", "max_tokens": 100, "temperature": 0,
                                        "ignore_eos": True, "stream": True}, stream=True)
    lines = (line for line in r.iter_lines(decode_unicode=True) if line)
    first = next(lines)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in [first, *rest[:-1]]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    with contextlib.suppress(requests.ConnectionError):  # the socket is closed (or, just before, requests refused)
        assert requests.get(server.url + "/health", timeout=5).status_code == 503
    assert server.proc.wait(60) == 0, server.output()
    assert "stopped (all requests finished)" in server.output()
