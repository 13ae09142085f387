"""A teacher model behind any OpenAI-compatible endpoint, called through the `openai` client's async API.

The client's own retries are off: every retry is made and counted here. Retried: 429, 408, 409 and 5xx answers,
timeouts and dropped connections, with exponential backoff and full jitter (a uniform wait in [0, initial * 2^n],
capped) and never sooner than the server's Retry-After (seconds or an HTTP date; OpenAI's retry-after-ms too).
Not retried: 400 and 422 (the request itself is bad: the item fails). Fatal for the whole run: 401, 403 and 404
(a wrong key, model or URL: every request would fail the same way).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import os
import random
import time
from collections import Counter

import openai

API_KEY_ENV = "OPENAI_API_KEY"


class FatalTeacherError(Exception):
    """An answer that every request of the run would get (401, 403, 404): the run stops."""


class RequestFailed(Exception):
    """A request that failed for good: not retryable, or out of retries. `cause` is its last error's kind."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 8
    initial: float = 1.0  # seconds: the first backoff's upper bound
    maximum: float = 60.0  # seconds: no backoff longer than this (Retry-After may ask for more)
    max_retry_after: float = 600.0  # seconds: a longer Retry-After is cut to this

    def backoff(self, retry: int, rng: random.Random, retry_after: float | None) -> float:
        """Seconds to wait before retry number `retry` (0-based): full jitter, at least Retry-After."""
        wait = rng.uniform(0.0, min(self.maximum, self.initial * 2.0 ** retry))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait


def parse_retry_after(headers) -> float | None:
    """Seconds a server asked to wait: retry-after-ms, or Retry-After as seconds or an HTTP date; None if absent or
    unreadable."""
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def classify(error: Exception) -> tuple[str, bool]:
    """(kind, retryable) of a failed request; raises FatalTeacherError for answers no retry can change."""
    if isinstance(error, openai.APITimeoutError):
        # openai's aiohttp transport reports a dropped connection as a timeout too: the root cause tells them apart
        return ("timeout" if isinstance(_root_cause(error), TimeoutError) else "connection"), True
    if isinstance(error, openai.APIConnectionError):
        return "connection", True
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        if status in (401, 403, 404):
            raise FatalTeacherError(f"the endpoint answered {status}: {error.message} (check --base_url, --model "
                                    f"and ${API_KEY_ENV})") from error
        if status == 429 or status in (408, 409) or status >= 500:
            return ("5xx" if status >= 500 else str(status)), True
        return str(status), False
    if isinstance(error, openai.APIResponseValidationError | ValueError):
        return "bad_response", False
    raise error


class Teacher:
    """One async client for a run: `await teacher.complete(system, prompt)` -> Completion, with retries."""

    def __init__(self, base_url: str, model: str, *, api: str = "chat", timeout: float = 120.0,
                 concurrency: int = 64, retry: RetryPolicy = RetryPolicy(), sampling: dict | None = None,
                 api_key: str | None = None, seed: int = 0):
        if api not in ("chat", "completions"):
            raise ValueError(f"--api={api} must be chat or completions.")
        if timeout <= 0:
            raise ValueError(f"--request_timeout={timeout} must be > 0 seconds.")
        import httpx2

        logging.getLogger("httpx2").setLevel(logging.WARNING)  # else a line per request at INFO
        # openai's aiohttp transport: in a probe here it took about 1.6x less CPU per request than the default.
        limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or os.environ.get(API_KEY_ENV) or "none",
                                         timeout=timeout, max_retries=0,
                                         http_client=openai.DefaultAioHttpClient(limits=limits, timeout=timeout))
        self.model, self.api, self.retry = model, api, retry
        self.sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
        self.rng = random.Random(seed)
        self.requests = 0
        self.retries: Counter[str] = Counter()  # kind -> retried requests
        self.failures: Counter[str] = Counter()  # kind -> items that failed for good

    async def _request(self, system: str | None, prompt: str) -> Completion:
        if self.api == "chat":
            messages = ([{"role": "system", "content": system}] if system else []) + \
                       [{"role": "user", "content": prompt}]
            r = await self.client.chat.completions.create(model=self.model, messages=messages, **self.sampling)
            if not r.choices:
                raise ValueError("an answer with no choices")
            text = r.choices[0].message.content or ""
        else:
            full = f"{system}\n\n{prompt}" if system else prompt
            r = await self.client.completions.create(model=self.model, prompt=full, **self.sampling)
            if not r.choices:
                raise ValueError("an answer with no choices")
            text = r.choices[0].text or ""
        usage = r.usage
        return Completion(text, r.choices[0].finish_reason, usage.prompt_tokens if usage else None,
                          usage.completion_tokens if usage else None)

    async def complete(self, system: str | None, prompt: str) -> Completion:
        """The teacher's answer, retried as the module docstring says; RequestFailed when it fails for good."""
        for attempt in range(self.retry.max_retries + 1):
            self.requests += 1
            try:
                return await self._request(system, prompt)
            except (openai.OpenAIError, ValueError) as e:
                kind, retryable = classify(e)
                if not retryable or attempt == self.retry.max_retries:
                    self.failures[kind] += 1
                    why = "not retryable" if not retryable else f"after {attempt} retries"
                    raise RequestFailed(kind, f"{kind} ({why}): {str(e)[:200]}") from None
                self.retries[kind] += 1
                response = getattr(e, "response", None)
                retry_after = parse_retry_after(response.headers if response is not None else None)
                await asyncio.sleep(self.retry.backoff(attempt, self.rng, retry_after))
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self.client.close()
