"""A deterministic OpenAI-compatible teacher on 127.0.0.1 for the data-generation tests and benchmarks.

    python tests/teacher_server.py [--port=0] [--fault_rate=0.3] [--retry_after=0.2] [--latency=0] [--seed=0]

It answers POST /v1/chat/completions and /v1/completions (the fields tools.synthesize and the quality filter's
annotator send) and prints `listening on PORT` once it accepts connections. Answers are a pure function of the
prompt:
- a prompt asking for an educational-value score (phi_jax.datagen.annotate's prompt) gets `Score: 8` when the
  document holds a `return` statement, `Score: 2` when not, and an unparseable sentence for about 1 in 10 documents;
- any other prompt gets a "textbook" of 20-199 words seeded by the prompt's hash; beyond `max_tokens` words it is
  cut and its finish_reason is "length". Usage counts words as tokens.
With --fault_rate, that fraction of requests (drawn by a seeded generator) fails, equally often as: 429 with
`Retry-After: RETRY_AFTER`, 500, or a dropped connection (closed without an answer). GET /stats returns the
counts, and the shortest wait any client left between a 429 and its next request for the same prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import time

from aiohttp import web

WORDS = ("the", "a", "function", "returns", "value", "student", "learns", "loop", "list", "example", "we", "see",
         "how", "data", "flows", "through", "each", "step", "of", "program", "variable", "holds", "number", "text")
SCORE_MARKER = "educational value"


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def answer(prompt: str) -> str:
    """The deterministic completion of a prompt, before any max_tokens cut."""
    h = _digest(prompt)
    if SCORE_MARKER in prompt:
        document = prompt.split("<document>", 1)[-1].split("</document>", 1)[0]
        if h % 10 == 0:
            return "I would rather not rate this document."
        return "Score: 8" if re.search(r"\breturn\b", document) else "Score: 2"
    rng = random.Random(h)
    first = prompt.strip().splitlines()[0][:80] if prompt.strip() else ""
    words = [rng.choice(WORDS) for _ in range(20 + h % 180)]
    return f"# {first}\n" + " ".join(words)


class Teacher:
    def __init__(self, fault_rate: float, retry_after: float, latency: float, seed: int):
        self.fault_rate, self.retry_after, self.latency = fault_rate, retry_after, latency
        self.rng = random.Random(seed)
        self.stats = {"requests": 0, "answered": 0, "429": 0, "500": 0, "dropped": 0, "min_wait_after_429": None}
        self.last_429: dict[int, float] = {}

    def _fault(self) -> str | None:
        if self.fault_rate <= 0 or self.rng.random() >= self.fault_rate:
            return None
        return self.rng.choice(("429", "500", "dropped"))

    async def complete(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        body = await request.json()
        chat = request.path.endswith("/chat/completions")
        prompt = "\n".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        key, now = _digest(prompt), time.monotonic()
        if key in self.last_429:
            wait = now - self.last_429.pop(key)
            best = self.stats["min_wait_after_429"]
            self.stats["min_wait_after_429"] = wait if best is None else min(best, wait)
        fault = self._fault()
        if fault == "429":
            self.stats["429"] += 1
            self.last_429[key] = now
            return web.json_response({"error": {"message": "rate limited", "type": "rate_limit"}}, status=429,
                                     headers={"Retry-After": f"{self.retry_after:g}"})
        if fault == "500":
            self.stats["500"] += 1
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
        if fault == "dropped":
            self.stats["dropped"] += 1
            request.transport.close()  # the client sees the connection end with no answer
            return web.Response(status=500)
        if self.latency:
            await asyncio.sleep(self.latency)
        words = answer(prompt).split(" ")
        limit = body.get("max_tokens") or len(words)
        finish = "length" if len(words) > limit else "stop"
        text = " ".join(words[:limit])
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": min(len(words), limit)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self.stats["answered"] += 1
        return web.json_response({"id": f"cmpl-{key:x}", "object": "chat.completion" if chat else "text_completion",
                                  "created": 0, "model": body.get("model", "teacher"), "choices": [choice],
                                  "usage": usage})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--fault_rate", type=float, default=0.0)
    p.add_argument("--retry_after", type=float, default=0.2, help="seconds in a 429's Retry-After header")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    teacher = Teacher(a.fault_rate, a.retry_after, a.latency, a.seed)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", teacher.complete)
    app.router.add_post("/v1/completions", teacher.complete)
    app.router.add_get("/stats", teacher.get_stats)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", a.port, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"listening on {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()


class Server:
    """`with Server(fault_rate=0.3) as s:` runs this file as a real process on 127.0.0.1; s.base_url, s.stats()."""

    def __init__(self, **flags):
        self.flags = [f"--{k}={v}" for k, v in flags.items()]

    def __enter__(self) -> Server:
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, __file__, *self.flags], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"the teacher server did not start: {line!r}")
        self.port = int(line.split()[-1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        return self

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as r:
            return json.loads(r.read())

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
