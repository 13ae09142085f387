"""Runs many teacher requests at once: bounded concurrency, a failure budget, progress with ETA, a final summary.

`run_jobs` keeps `concurrency` requests in flight (teacher endpoints are slow per request, so depth is what keeps
them busy), hands each answer to `to_record`, which names the journal stream it goes to, and stops taking new jobs
once more than `max_failures` items have failed for good (or at once on a fatal answer such as 401). Records
reach the journal as they come; the journal makes them durable in batches. A SIGTERM or SIGINT stops the run the
same way: the records already answered are written, the rest are left for the next run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterable

from phi_jax.datagen.journal import Journal
from phi_jax.datagen.teacher import Completion, FatalTeacherError, RequestFailed, Teacher

log = logging.getLogger("phi_jax")


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    system: str | None
    prompt: str
    meta: object = None  # whatever to_record needs to build the record


@dataclasses.dataclass(frozen=True)
class Prices:
    """USD per million tokens, for the summary's cost estimate."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """A tqdm bar in a terminal; elsewhere (a log file, a pipe) one log line every `every` seconds."""

    def __init__(self, total: int, desc: str, every: float = 30.0):
        self.total, self.desc, self.every, self.done = total, desc, every, 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True)

    def update(self, n: int, postfix: str) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every:
            self.log(postfix)

    def log(self, postfix: str) -> None:
        self.last = now = time.monotonic()
        rate = self.done / max(now - self.start, 1e-9)
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        log.info("%s: %d of %d (%.0f%%) %.1f/s eta %s %s", self.desc, self.done, self.total,
                 100 * self.done / max(self.total, 1), rate, eta, postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run_jobs(jobs: Iterable[Job], pending: int, teacher: Teacher, journal: Journal,
                   to_record: Callable[[Job, Completion], tuple[str, dict]], *, concurrency: int,
                   max_failures: int, desc: str, prices: Prices = Prices(), progress_every: float = 30.0) -> dict:
    """Answers every job (none already in the journal), writes each record, and returns the run's summary."""
    if concurrency < 1:
        raise ValueError(f"--concurrency={concurrency} must be >= 1.")
    it = iter(jobs)
    stats = {"completed": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "peak_in_flight": 0,
             "streams": dict.fromkeys(journal.paths, 0)}
    failed_examples: list[str] = []
    stop_reason: list[str] = []
    in_flight = 0
    progress = Progress(pending, desc, progress_every)
    start, cpu_start = time.monotonic(), time.process_time()

    workers: asyncio.Future | None = None

    def stop(reason: str) -> None:
        """Ends the run: no new job starts, requests in flight are abandoned (their items stay for the next run)."""
        if not stop_reason:
            stop_reason.append(reason)
        if workers is not None:
            workers.cancel()

    def postfix() -> str:
        retries = sum(teacher.retries.values())
        return f"in flight {in_flight}, retries {retries}, failed {stats['failed']}"

    async def worker() -> None:
        nonlocal in_flight
        while not stop_reason:
            job = next(it, None)
            if job is None:
                return
            in_flight += 1
            stats["peak_in_flight"] = max(stats["peak_in_flight"], in_flight)
            try:
                completion = await teacher.complete(job.system, job.prompt)
            except RequestFailed as e:
                stats["failed"] += 1
                if len(failed_examples) < 5:
                    failed_examples.append(f"{job.id}: {e}")
                if stats["failed"] > max_failures:
                    stop(f"{stats['failed']} items failed for good, over the budget --max_failures={max_failures}; "
                         f"last: {e}")
                progress.update(1, postfix())
                continue
            except FatalTeacherError as e:
                stop(str(e))
                return
            finally:
                in_flight -= 1
            stream, record = to_record(job, completion)
            journal.add(stream, record)
            stats["completed"] += 1
            stats["streams"][stream] += 1
            stats["prompt_tokens"] += completion.prompt_tokens or 0
            stats["completion_tokens"] += completion.completion_tokens or 0
            progress.update(1, postfix())

    async def flusher() -> None:  # records answered while no other arrives still reach the disk
        while True:
            await asyncio.sleep(journal.batch_seconds)
            journal.flush()
            if progress.bar is None and time.monotonic() - progress.last >= progress.every:
                progress.log(postfix())

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, f"interrupted by {sig.name}")
    flush_task = asyncio.create_task(flusher())
    workers = asyncio.gather(*(worker() for _ in range(concurrency)))
    try:
        await workers
    except asyncio.CancelledError:
        if not stop_reason:  # cancelled from outside, not by stop()
            raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        flush_task.cancel()
        journal.flush()
        progress.close()
        await teacher.aclose()
    elapsed = time.monotonic() - start
    return {"desc": desc, "pending_at_start": pending, "resumed": journal.resumed, **stats,
            "unfinished": pending - stats["completed"] - stats["failed"],
            "requests": teacher.requests, "retries": dict(teacher.retries), "failures": dict(teacher.failures),
            "failed_examples": failed_examples, "stopped": stop_reason[0] if stop_reason else None,
            "seconds": round(elapsed, 3), "items_per_second": round(stats["completed"] / max(elapsed, 1e-9), 2),
            "cpu_seconds_per_request": round((time.process_time() - cpu_start) / max(teacher.requests, 1), 6),
            "estimated_cost_usd": round(prices.cost(stats["prompt_tokens"], stats["completion_tokens"]), 4),
            "journal_counts": dict(journal.counts)}


def format_summary(s: dict) -> str:
    retries = ", ".join(f"{k} {v}" for k, v in sorted(s["retries"].items())) or "none"
    failures = ", ".join(f"{k} {v}" for k, v in sorted(s["failures"].items())) or "none"
    streams = ", ".join(f"{k} {v}" for k, v in s["streams"].items())
    lines = [f"{s['desc']}: {s['completed']} items answered this run ({streams}), {s['failed']} failed, "
             f"{s['unfinished']} left; {s['resumed']} were already done before this run",
             f"  requests {s['requests']}, retries: {retries}; failed for good: {failures}",
             f"  tokens: {s['prompt_tokens']} prompt + {s['completion_tokens']} completion, estimated cost "
             f"${s['estimated_cost_usd']:.2f}; {s['items_per_second']} items/s over {_clock(s['seconds'])}, peak "
             f"{s['peak_in_flight']} in flight"]
    if s["failed_examples"]:
        lines.append("  failed items (first few): " + "; ".join(s["failed_examples"]))
    if s["stopped"]:
        lines.append(f"  STOPPED: {s['stopped']}. Run the same command again to resume (done items are kept).")
    elif s["failed"]:
        lines.append("  Run the same command again to retry the failed items.")
    return "\n".join(lines)
