"""Serving throughput and latency: N concurrent streaming clients against `python -m phi_jax.serve` on 127.0.0.1,
beside one request at a time to the same server and transformers' `generate` with static batches of N (CPU torch)
on the same weights.

    python -m tools.bench_serve [--preset=quickstart,phi-100m] [--clients=16] [--requests=32] [--out=FILE]

Per preset: random weights (init_model, seed 0) exported with save_pretrained and a SentencePiece tokenizer trained
on a slice of the standard library. The requests are token-id prompts of mixed lengths (uniform in [prompt_len/2,
3 prompt_len/2]) asking for mixed numbers of new tokens (the same spread around new_tokens), EOS ignored; every
scenario runs the same list. Scenarios:
- `concurrent`: `clients` threads, each sending its share of the requests one after another (a closed loop),
  streamed: time to first token (TTFT) and the gaps between a request's chunks (inter-token latency, ITL), p50 and
  p99, and throughput = generated tokens / wall time. Client i starts after i * ramp / clients seconds; the default
  ramp is the median duration of a request in the warm-up round (all clients at once), so that arrivals are spread
  as in a steady state rather than one burst. Its throughput is given for the whole run and for the steady state
  (the tokens streamed while all clients were active, over that window: no ramp and no tail).
- `burst`: the same with every client starting at once (the first requests wait for each other's prefill).
- `sequential`: the same requests one at a time (one client) to a server with one slot: one-request-at-a-time
  phi_jax (a server with more slots would run every idle slot in each decode step as well).
- `transformers`: the same requests in static batches of `clients` (left-padded, each batch generating as many tokens
  as its longest request asks for); throughput counts the tokens the requests asked for.
- `prefill`: TTFT of a single prompt_len-token request on the idle server (median of 5): the unloaded prefill.
The load average (os.getloadavg) is recorded around each scenario: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tools._bench import command, machine, preset_list, print_table, write_json

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench"


def make_requests(n: int, prompt_len: int, new_tokens: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len // 2, prompt_len * 3 // 2 + 1, n)
    news = rng.integers(new_tokens // 2, new_tokens * 3 // 2 + 1, n)
    return [(rng.integers(3, vocab, int(p)).tolist(), int(m)) for p, m in zip(lengths, news, strict=True)]


def stream_one(url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: its send time, chunk arrival times and token count."""
    import requests

    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, tokens = [], 0
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: "):])
            if chunk["choices"]:
                times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"start": start, "times": times, "tokens": tokens}


def compiled(url: str) -> int:
    import requests

    return sum(requests.get(url + "/health", timeout=30).json()["compiled_programs"].values())


def run_clients(url: str, requests_: list, clients: int, ramp: float) -> dict:
    """`clients` threads share the requests round-robin, each sending its own one after another. Besides the
    whole run's throughput, the steady state's: the tokens streamed while every client was active (from the last
    client's first request to the first client's end) over that window; None when the window is empty."""
    results: list[dict] = []
    spans: list[tuple[float, float]] = []  # each client's first send and last token
    programs = compiled(url)
    lock = threading.Lock()

    def client(i: int):
        time.sleep(i * ramp / clients)
        first = time.perf_counter()
        for prompt, max_tokens in requests_[i::clients]:
            out = stream_one(url, prompt, max_tokens)
            with lock:
                results.append(out)
        with lock:
            spans.append((first, time.perf_counter()))

    load = os.getloadavg()[0]
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r["times"][0] - r["start"] for r in results]
    itl = [gap for r in results for gap in np.diff(r["times"])]
    tokens = sum(r["tokens"] for r in results)
    low, high = max(a for a, _ in spans), min(b for _, b in spans)
    steady = (sum(low <= t < high for r in results for t in r["times"]) / (high - low)) if high > low else None
    return {"requests": len(results), "generated_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "steady_tokens_per_s": steady, "steady_window_s": max(0.0, high - low),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)), "itl_p99_ms": 1e3 * float(np.percentile(itl, 99)),
            "median_duration_s": float(np.median([r["times"][-1] - r["start"] for r in results])),
            "programs_compiled_during_run": compiled(url) - programs,
            "load_avg_before": load, "load_avg_after": os.getloadavg()[0]}


def torch_threads(model, batch: int, width: int) -> tuple[int, dict]:
    """The faster of 1 thread and one per CPU for torch on this machine now: on a shared, oversubscribed host
    torch's OpenMP threads can be 30x slower than one thread (seen here), which would flatter phi_jax."""
    import torch

    ids = torch.ones((batch, width), dtype=torch.long)
    times = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        times[threads] = time.perf_counter() - start
    best = min(times, key=times.get)
    torch.set_num_threads(best)
    return best, {str(k): v for k, v in times.items()}


def bench_transformers(hf_dir: Path, requests_: list, batch: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    load = os.getloadavg()[0]
    with torch.no_grad():
        threads, probe = torch_threads(model, batch, max(len(p) for p, _ in requests_))
        start = time.perf_counter()
        for i in range(0, len(requests_), batch):
            group = requests_[i:i + batch]
            width = max(len(p) for p, _ in group)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (p, _) in enumerate(group):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            new = max(m for _, m in group)
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
        wall = time.perf_counter() - start
    tokens = sum(m for _, m in requests_)
    return {"requests": len(requests_), "generated_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "torch_threads": threads, "thread_probe_s": probe, "load_avg_before": load,
            "load_avg_after": os.getloadavg()[0]}


def start_server(model_dir: Path, slots: int, max_len: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")  # noqa: SIM115 (the server's output, for as long as it runs)
    proc = subprocess.Popen([sys.executable, "-m", "phi_jax.serve", f"--model={model_dir}", f"--port={port}",
                             f"--slots={slots}", f"--max_len={max_len}", f"--served_model_name={MODEL}",
                             "--max_queue=1024"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900  # loading and compiling every program first (--warmup)
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(1)
    proc.kill()
    raise TimeoutError(f"the server did not start within 900 s; see {log_path}")


def prepare(preset: str, tmp: Path) -> tuple[Path, int]:
    """A random model of the preset with a SentencePiece tokenizer, exported as a Hugging Face directory."""
    from phi_jax import save_pretrained
    from phi_jax.config import PhiConfig
    from phi_jax.data.corpus import stdlib_files
    from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece
    from phi_jax.hf.tokenizer import hf_tokenizer_files
    from phi_jax.model import init_model

    cfg = PhiConfig.preset(preset)
    docs = [p.read_text(encoding="utf-8") for p in stdlib_files()[:300]]
    sp = train_sentencepiece(docs, tmp / f"sp-{preset}", vocab_size=min(cfg.vocab_size, 4096))
    out = save_pretrained(init_model(cfg, seed=0), tmp / preset,
                          extra_files=hf_tokenizer_files(sp, model_max_length=cfg.max_position_embeddings))
    return out, load_tokenizer(sp).vocab_size


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="quickstart,phi-100m", help="named architectures, comma-separated")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--ramp", type=float, default=None,
                   help="seconds over which the clients start (default: a request's median duration when loaded)")
    p.add_argument("--max_len", type=int, default=512, help="the server's --max_len (prompt + new tokens)")
    p.add_argument("--scenarios", default="prefill,concurrent,burst,sequential,transformers")
    p.add_argument("--out", default="bench_serve.json")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 1 <= args.requests <= 1024:
        p.error(f"--clients={args.clients} must be in [1, 64] and --requests={args.requests} in [1, 1024].")
    scenarios = args.scenarios.split(",")

    report = {"command": command(__file__, argv), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), "results": []}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in preset_list(p, args.preset):
            model_dir, vocab = prepare(preset, Path(tmp))
            reqs = make_requests(args.requests, args.prompt_len, args.new_tokens, vocab)
            row: dict = {"preset": preset}
            proc, url = start_server(model_dir, args.clients, args.max_len, Path(tmp) / f"server-{preset}.log")
            try:
                warm = run_clients(url, reqs[:args.clients], args.clients, 0.0)  # every path once, under load
                ramp = warm["median_duration_s"] if args.ramp is None else args.ramp
                row["ramp_s"] = ramp
                if "prefill" in scenarios:
                    prompt = (reqs[0][0] * 2)[:args.prompt_len]
                    single = [stream_one(url, prompt, 1) for _ in range(6)][1:]
                    row["prefill_s"] = float(np.median([r["times"][0] - r["start"] for r in single]))
                if "concurrent" in scenarios:
                    row["concurrent"] = run_clients(url, reqs, args.clients, ramp)
                if "burst" in scenarios:
                    row["burst"] = run_clients(url, reqs, args.clients, 0.0)
            finally:
                proc.terminate()
                proc.wait(120)
            if "sequential" in scenarios:
                proc, url = start_server(model_dir, 1, args.max_len, Path(tmp) / f"server-{preset}-1.log")
                try:
                    run_clients(url, reqs[:2], 1, 0.0)
                    row["sequential"] = run_clients(url, reqs, 1, 0.0)
                finally:
                    proc.terminate()
                    proc.wait(120)
            if "transformers" in scenarios:
                row["transformers"] = bench_transformers(model_dir, reqs, args.clients)
            c = row.get("concurrent", {})
            for base in ("sequential", "transformers"):
                if c and base in row:
                    row[f"speedup_vs_{base}"] = c["tokens_per_s"] / row[base]["tokens_per_s"]
                    if c["steady_tokens_per_s"]:
                        row[f"steady_speedup_vs_{base}"] = c["steady_tokens_per_s"] / row[base]["tokens_per_s"]
            if c and "prefill_s" in row:
                row["ttft_p99_vs_prefill"] = c["ttft_p99_s"] / row["prefill_s"]
            report["results"].append(row)
            for name in ("concurrent", "burst", "sequential", "transformers"):
                if name in row:
                    r = row[name]
                    rows.append({"preset": preset, "scenario": name, "requests": r["requests"],
                                 "tokens/s": r["tokens_per_s"], "steady tokens/s": r.get("steady_tokens_per_s") or "",
                                 "TTFT p50 s": r.get("ttft_p50_s", ""),
                                 "TTFT p99 s": r.get("ttft_p99_s", ""), "ITL p50 ms": r.get("itl_p50_ms", ""),
                                 "ITL p99 ms": r.get("itl_p99_ms", ""), "load": r["load_avg_before"]})
            nan = float("nan")
            print(f"{preset}: unloaded prefill {row.get('prefill_s', nan):.3f} s; concurrent vs sequential "
                  f"{row.get('speedup_vs_sequential', nan):.2f}x (steady state "
                  f"{row.get('steady_speedup_vs_sequential', nan):.2f}x), vs transformers "
                  f"{row.get('speedup_vs_transformers', nan):.2f}x (steady state "
                  f"{row.get('steady_speedup_vs_transformers', nan):.2f}x), TTFT p99 / prefill "
                  f"{row.get('ttft_p99_vs_prefill', nan):.2f}", flush=True)
    print_table(f"bench_serve: {args.clients} clients, {args.requests} requests, prompts ~{args.prompt_len}, "
                f"new ~{args.new_tokens} ({report['uptime']})", rows)
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
