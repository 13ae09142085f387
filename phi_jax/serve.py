"""An OpenAI-compatible HTTP server: `python -m phi_jax.serve --model=PATH_OR_ID [--port=8000] [--slots=N]`.

Endpoints: POST /v1/completions and /v1/chat/completions (streamed as server-sent events when asked), GET
/v1/models, GET /health, GET /metrics (Prometheus), and vLLM's POST /tokenize, /detokenize and GET /tokenizer_info
(lm-eval's `local-completions` reads the server's tokenizer through them).

Built on FastAPI and uvicorn. The requests are batched by phi_jax.engine: one loop thread owns the KV cache and
lets requests join and leave between decode steps; an HTTP handler only submits its request and awaits its updates.
LitServe was not chosen because its batching is static: it gathers up to `max_batch_size` requests, runs them
together to the end and answers (its loop owns the batch, not the requests), which is what continuous batching
replaces.

Chat: phi-1.5 is a base model, so the chat endpoint renders the messages with a plain template (below) and
continues it; answers are only as good as the model's training, and chat quality needs fine-tuning. The template:

    {system content}\\n\\n          (when there is a system message)
    User: {content}\\n              (each user message)
    Assistant: {content}\\n         (each assistant message)
    Assistant:                      (the model continues here; generation also stops at "\\nUser:")

Errors are OpenAI's JSON ({"error": {"message", "type", "param", "code"}}): 400 for an invalid parameter or a
prompt that does not fit the context (with the numbers), 401 without the API key when one is set, 404 for an
unknown model name, 429 when the queue is full, 503 while shutting down. A client that disconnects frees its slot.
SIGTERM (or Ctrl-C) stops taking requests, lets those in flight finish (at most --drain_timeout seconds), exits 0.
"""

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from phi_jax.engine import Delta, Engine, Request, SamplingParams

log = logging.getLogger("phi_jax")

API_KEY_ENV = "PHI_JAX_API_KEY"
CHAT_STOP = "\nUser:"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # as vLLM: unknown OpenAI fields are accepted and unused

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's extension: 0 or -1 for no limit
    n: int = Field(1, ge=1, le=64)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension
    stream: bool = False
    stream_options: dict | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """The plain chat template of the module docstring."""
    parts = []
    for m in messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(
            p.get("text", "") for p in m.content if p.get("type") == "text")
        content = content or ""
        if m.role in ("system", "developer"):
            parts.append(f"{content}\n\n")
        elif m.role == "user":
            parts.append(f"User: {content}\n")
        else:
            parts.append(f"Assistant: {content}\n")
    return "".join(parts) + "Assistant:"


class Metrics:
    """The Prometheus metrics of one server (its own registry)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        Gauge("phi_jax_queue_length", "Requests waiting for a slot", registry=r).set_function(
            lambda: engine.queue_length)
        Gauge("phi_jax_live_slots", "Slots holding a request", registry=r).set_function(lambda: engine.live_slots)
        Gauge("phi_jax_slots", "Slots of the engine", registry=r).set(engine.slots)
        Gauge("phi_jax_compiled_programs", "Programs the engine has compiled", registry=r).set_function(
            lambda: sum(engine.compilations().values()))
        self.generated = Counter("phi_jax_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("phi_jax_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.requests = Counter("phi_jax_requests", "Finished engine requests", ["finish_reason"], registry=r)
        buckets = (.005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 20, 60)
        self.ttft = Histogram("phi_jax_time_to_first_token_seconds", "Arrival to first token", buckets=buckets,
                              registry=r)
        self.itl = Histogram("phi_jax_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2), registry=r)

    def observe(self, request: Request, delta: Delta, last_time: float | None) -> None:
        if delta.token_ids:
            if last_time is None:
                self.ttft.observe(delta.time - request.arrival)
                self.prompt_tokens.inc(len(request.prompt_ids))
            else:
                self.itl.observe((delta.time - last_time) / len(delta.token_ids))
            self.generated.inc(len(delta.token_ids))
        if delta.finish_reason is not None:
            self.requests.labels(delta.finish_reason).inc()


class _Stream:
    """The updates of a group of engine requests (one HTTP request: prompts x n), delivered to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics):
        self.loop, self.metrics, self.queue = loop, metrics, asyncio.Queue()
        self.last: dict[str, float] = {}

    def on_update(self, request: Request, delta: Delta) -> None:  # the engine's thread
        self.metrics.observe(request, delta, self.last.get(request.id))
        if delta.token_ids:
            self.last[request.id] = delta.time
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (request, delta))


class Server:
    """The HTTP layer over one engine: builds the FastAPI app."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, *, api_key: str | None = None,
                 max_queue: int = 256):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.api_key, self.max_queue = api_key, max_queue
        self.metrics = Metrics(engine)
        self.draining = False
        self.created = int(time.time())

    # ---- parsing and checks ----------------------------------------------------------------------------------
    def _parse(self, cls, raw: bytes):
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"The body is not valid JSON: {e}.") from None
        try:
            body = cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first["loc"]) or None
            raise APIError(400, f"Invalid parameter {param}: {first['msg']} (got {first.get('input')!r}).",
                           param=param) from None
        if body.model != self.model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{self.model_name}` "
                                "(GET /v1/models).", param="model", code="model_not_found")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name}={getattr(body, name)} is not supported (only 0).", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported.", param="logit_bias")
        return body

    def _params(self, body: _Body, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                extra_stop: tuple[str, ...] = (), choice: int = 0) -> SamplingParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
            seed=None if body.seed is None else body.seed + choice, stop=stop + extra_stop,
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs)

    def _check_capacity(self, count: int) -> None:
        if self.draining:
            raise APIError(503, "The server is shutting down and takes no new requests.", "service_unavailable")
        if count > self.max_queue:
            raise APIError(400, f"This request needs {count} completions (prompts x n), more than the queue holds "
                                f"({self.max_queue}, --max_queue); send fewer at a time.", param="n")
        waiting = self.engine.queue_length
        if waiting + count > self.max_queue:
            raise APIError(429, f"The queue is full: {waiting} requests waiting, at most {self.max_queue} "
                                "(--max_queue); retry later.", "rate_limit_error", code="queue_full")

    def _submit(self, prompts: list[list[int]], params: list[SamplingParams], stream: _Stream) -> list[Request]:
        for ids, p in zip(prompts, params, strict=True):
            try:
                self.engine.check(ids, p)
            except ValueError as e:
                code = "context_length_exceeded" if "tokens, more than" in str(e) else None
                raise APIError(400, str(e), param="prompt" if code else None, code=code) from None
        self._check_capacity(len(prompts))
        return [self.engine.submit(ids, p, on_update=stream.on_update) for ids, p in zip(prompts, params,
                                                                                          strict=True)]

    def _encode_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty.", param="prompt")
        if all(isinstance(x, int) for x in prompt):
            return [list(prompt)]
        out = []
        for p in prompt:
            ids = self.tok.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "A prompt is empty: it needs at least one token.", param="prompt")
            out.append(ids)
        return out

    # ---- formatting ------------------------------------------------------------------------------------------
    def _piece(self, token: int) -> str:
        return self.tok.decode([token])

    def _completion_logprobs(self, ids, chosen, tops, offset: int) -> dict:
        tokens = [self._piece(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": list(chosen), "text_offset": offsets,
                "top_logprobs": [None if top is None else self._top_dict(top) for top in tops]}

    def _top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """OpenAI's {token text: logprob}; tokens whose texts are equal (e.g. byte pieces shown as U+FFFD) keep the
        highest."""
        out: dict[str, float] = {}
        for token, lp in top:
            out.setdefault(self._piece(token), lp)
        return out

    # ---- endpoints -------------------------------------------------------------------------------------------
    async def completions(self, raw: bytes, is_disconnected):
        body = self._parse(CompletionBody, raw)
        if body.suffix:
            raise APIError(400, "suffix is not supported.", param="suffix")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not supported (only equal to n).", param="best_of")
        prompts = self._encode_prompts(body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 generates nothing: set max_tokens >= 1, or echo=true with logprobs "
                                "to score the prompt.", param="max_tokens")
        lp = body.logprobs
        prompt_lp = lp if body.echo and lp is not None else (0 if body.echo and body.max_tokens == 0 else None)
        expanded = [(i, j, ids) for i, ids in enumerate(prompts) for j in range(body.n)]
        max_tokens = lambda ids: max(1, self.engine.max_len - len(ids)) if body.max_tokens is None else body.max_tokens
        params = [self._params(body, max_tokens(ids), lp, prompt_lp, choice=j) for _, j, ids in expanded]
        stream = _Stream(asyncio.get_running_loop(), self.metrics)
        requests = self._submit([ids for _, _, ids in expanded], params, stream)
        index = {r.id: k for k, r in enumerate(requests)}
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        echo_text = {r.id: self.tok.decode(r.prompt_ids) if body.echo else "" for r in requests}

        def choice_logprobs(r: Request, delta: Delta | None):
            if lp is None:
                return None
            if delta is None:  # the whole completion
                ids, chosen, tops = list(r.token_ids), list(r.logprobs), list(r.top_logprobs)
                if body.echo:
                    ids, chosen = r.prompt_ids + ids, (r.prompt_logprobs or [None] * len(r.prompt_ids)) + chosen
                    tops = (r.prompt_top_logprobs or [None] * len(r.prompt_ids)) + tops
                return self._completion_logprobs(ids, chosen, tops, 0)
            ids, chosen, tops = list(delta.token_ids), list(delta.logprobs or []), list(delta.top_logprobs or [])
            if body.echo and delta.prompt_logprobs is not None:
                ids, chosen, tops = r.prompt_ids + ids, delta.prompt_logprobs + chosen, delta.prompt_top_logprobs + tops
            return self._completion_logprobs(ids, chosen, tops, 0)

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            async def events():
                started, finished = set(), 0
                try:
                    while finished < len(requests):
                        r, delta = await stream.queue.get()
                        text = delta.text
                        if r.id not in started:
                            started.add(r.id)
                            text = echo_text[r.id] + text
                        if delta.finish_reason is not None:
                            finished += 1
                        if not text and not delta.token_ids and delta.finish_reason is None:
                            continue  # (a token whose text is held back still gets its chunk: clients see progress)
                        chunk = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                 "choices": [{"index": index[r.id], "text": text,
                                              "logprobs": choice_logprobs(r, delta),
                                              "finish_reason": delta.finish_reason}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if include_usage:
                        usage = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                 "choices": [], "usage": self._usage(requests)}
                        yield f"data: {json.dumps(usage)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self._cancel_unfinished(requests)

            return "stream", events()

        await self._wait(requests, stream, is_disconnected)
        choices = [{"index": k, "text": echo_text[r.id] + r.text, "logprobs": choice_logprobs(r, None),
                    "finish_reason": r.finish_reason} for k, r in enumerate(requests)]
        return "json", {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                        "choices": choices, "usage": self._usage(requests)}

    async def chat(self, raw: bytes, is_disconnected):
        body = self._parse(ChatBody, raw)
        ids = self.tok.encode(chat_prompt(body.messages))
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.engine.max_len - len(ids))
        if max_tokens == 0:
            raise APIError(400, "max_tokens must be >= 1.", param="max_tokens")
        lp = (body.top_logprobs or 0) if body.logprobs else None
        params = [self._params(body, max_tokens, lp, None, (CHAT_STOP,), choice=j) for j in range(body.n)]
        stream = _Stream(asyncio.get_running_loop(), self.metrics)
        requests = self._submit([ids] * body.n, params, stream)
        index = {r.id: k for k, r in enumerate(requests)}
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def chat_logprobs(ids_, chosen, tops):
            if lp is None:
                return None
            return {"content": [{"token": self._piece(t), "logprob": c,
                                 "top_logprobs": [{"token": self._piece(i), "logprob": v} for i, v in top or []]}
                                for t, c, top in zip(ids_, chosen, tops, strict=True)]}

        if body.stream:
            async def events():
                started, finished = set(), 0
                try:
                    while finished < len(requests):
                        r, delta = await stream.queue.get()
                        d = {"content": delta.text}
                        if r.id not in started:
                            started.add(r.id)
                            d["role"] = "assistant"
                        if delta.finish_reason is not None:
                            finished += 1
                        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                 "model": self.model_name,
                                 "choices": [{"index": index[r.id], "delta": d,
                                              "logprobs": chat_logprobs(delta.token_ids, delta.logprobs or [],
                                                                        delta.top_logprobs or []),
                                              "finish_reason": delta.finish_reason}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self._cancel_unfinished(requests)

            return "stream", events()

        await self._wait(requests, stream, is_disconnected)
        choices = [{"index": k, "message": {"role": "assistant", "content": r.text},
                    "logprobs": chat_logprobs(r.token_ids, r.logprobs, r.top_logprobs),
                    "finish_reason": r.finish_reason} for k, r in enumerate(requests)]
        return "json", {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                        "choices": choices, "usage": self._usage(requests)}

    async def _wait(self, requests: list[Request], stream: _Stream, is_disconnected) -> None:
        """Until every request has finished; a client that goes away cancels them."""
        try:
            while not all(r.finished for r in requests):
                try:
                    await asyncio.wait_for(stream.queue.get(), timeout=0.5)
                except TimeoutError:
                    if await is_disconnected():
                        raise asyncio.CancelledError from None
        finally:
            self._cancel_unfinished(requests)

    def _cancel_unfinished(self, requests: list[Request]) -> None:
        """Frees the slots of the requests a client no longer waits for (a disconnect, a closed stream)."""
        for r in requests:
            if not r.finished:
                self.engine.cancel(r)

    @staticmethod
    def _usage(requests: list[Request]) -> dict:
        prompt = sum(len(r.prompt_ids) for r in requests)
        completion = sum(len(r.token_ids) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def app(self):
        """The FastAPI application."""
        from fastapi import FastAPI, Request as HTTPRequest  # noqa: I001 (FastAPI reads the annotations below)
        from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.engine.start()
            yield

        app = FastAPI(title="phi_jax", lifespan=lifespan)
        if self.api_key:
            app.add_middleware(_BearerAuth, api_key=self.api_key)

        async def answer(handler, request: HTTPRequest):
            try:
                kind, result = await handler(await request.body(), request.is_disconnected)
            except APIError as e:
                return JSONResponse(e.body(), status_code=e.status)
            if kind == "stream":
                return StreamingResponse(result, media_type="text/event-stream")
            return JSONResponse(result)

        @app.post("/v1/completions")
        async def completions(request: HTTPRequest):
            return await answer(self.completions, request)

        @app.post("/v1/chat/completions")
        async def chat(request: HTTPRequest):
            return await answer(self.chat, request)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "phi_jax", "max_model_len": self.engine.max_len}]}

        @app.get("/health")
        async def health():
            status = 503 if self.draining else 200
            return JSONResponse({"status": "draining" if self.draining else "ok",
                                 "live_slots": self.engine.live_slots, "slots": self.engine.slots,
                                 "queue_length": self.engine.queue_length,
                                 "compiled_programs": self.engine.compilations()}, status_code=status)

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.post("/tokenize")
        async def tokenize(request: HTTPRequest):
            data = json.loads(await request.body() or b"{}")
            if not isinstance(data.get("prompt"), str):
                return JSONResponse(APIError(400, "Send {\"prompt\": TEXT}.", param="prompt").body(), 400)
            tokens = self.tok.encode(data["prompt"])
            return {"tokens": tokens, "count": len(tokens), "max_model_len": self.engine.max_len}

        @app.post("/detokenize")
        async def detokenize(request: HTTPRequest):
            data = json.loads(await request.body() or b"{}")
            if not isinstance(data.get("tokens"), list):
                return JSONResponse(APIError(400, "Send {\"tokens\": [IDS]}.", param="tokens").body(), 400)
            return {"prompt": self.tok.decode(data["tokens"])}

        @app.get("/tokenizer_info")
        async def tokenizer_info():
            eos = self.tok.decode([self.tok.eos_id])
            return {"eos_token": eos, "bos_token": None, "pad_token": None, "model_max_length": self.engine.max_len}

        return app


class _BearerAuth:
    """Requires `Authorization: Bearer KEY` on /v1/ paths. Plain ASGI: Starlette's `@app.middleware("http")` would
    pass every chunk of a streamed response through an extra task and memory stream."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                from fastapi.responses import JSONResponse

                err = APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer KEY'.",
                               code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for serving beyond this machine (a host that is not a loopback address) without an API key."""
    if is_loopback(host) or api_key:
        return None
    return (f"Serving on {host} without an API key: anyone who can reach this address can use the model; pass "
            f"--api_key or set {API_KEY_ENV}.")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a training workdir, a Hugging Face phi directory (local or gs://) or a Hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, default=8, help="requests decoded together (rows of the KV cache)")
    parser.add_argument("--max_len", type=int, default=None,
                        help="prompt + generated tokens per request (default: the model's context)")
    parser.add_argument("--chunk", type=int, default=512, help="longest prompt prefilled in one piece")
    parser.add_argument("--served_model_name", default=None, help="the `model` clients name (default: --model)")
    parser.add_argument("--api_key", default=None, help=f"require 'Authorization: Bearer KEY' (or ${API_KEY_ENV})")
    parser.add_argument("--max_queue", type=int, default=256, help="waiting requests before 429")
    parser.add_argument("--drain_timeout", type=float, default=30.0,
                        help="seconds to let requests in flight finish after SIGTERM")
    parser.add_argument("--tensor_parallel", type=int, default=1, help="devices to split the model over")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--step", type=int, default=None, help="workdir checkpoint step (default: newest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default: the model's own)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the common programs before taking requests")
    args = parser.parse_args(argv)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if (warning := exposure_warning(args.host, api_key)) is not None:
        log.warning(warning)
    if args.slots < 1 or args.max_queue < 0 or args.tensor_parallel < 1:
        parser.error(f"--slots={args.slots} and --tensor_parallel={args.tensor_parallel} must be >= 1, "
                     f"--max_queue={args.max_queue} >= 0.")

    import uvicorn

    from phi_jax.config import Compute
    from phi_jax.generate import resolve_model_arg
    from phi_jax.loading import load

    source = resolve_model_arg(parser, args.model)
    model, tok = load(source, compute=Compute(dtype=args.dtype, param_dtype=args.dtype), step=args.step,
                      tokenizer=args.tokenizer, scan_layers=False)  # the decoding layout (phi_jax/model.py)
    mesh = None
    if args.tensor_parallel > 1:
        import jax

        from phi_jax.sharding import make_mesh

        mesh = make_mesh(data=1, fsdp=1, tensor=args.tensor_parallel,
                         devices=jax.devices()[:args.tensor_parallel])
    engine = Engine(model, tok, slots=args.slots, max_len=args.max_len, chunk=args.chunk, mesh=mesh)
    if args.warmup:
        started = time.perf_counter()
        engine.warmup()
        log.info("compiled %d programs in %.1f s", sum(engine.compilations().values()),
                 time.perf_counter() - started)
    server = Server(engine, tok, args.served_model_name or args.model, api_key=api_key, max_queue=args.max_queue)

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """SIGTERM / SIGINT: refuse new requests and drain. Unlike uvicorn's own handler, the signal is not
            raised again after the shutdown: a drained server exits with status 0."""
            server.draining = True
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop now
            self.should_exit = True

    config = uvicorn.Config(server.app(), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout)
    log.info("serving %s on http://%s:%d/v1 (%d slots, max_len %d)", server.model_name, args.host, args.port,
             engine.slots, engine.max_len)
    _Uvicorn(config).run()
    drained = engine.stop(timeout=args.drain_timeout)
    log.info("stopped (%s)", "all requests finished" if drained else "requests still running were cancelled")


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
