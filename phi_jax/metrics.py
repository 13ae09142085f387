"""Where metrics go: metrics.jsonl and TensorBoard in the workdir, and the console (process 0): a progress bar in a
terminal (log lines are written above it, not through it), otherwise a log line per write with step/total and ETA.

In a bucket (gs://) an object cannot be appended to: metrics.jsonl is rewritten whole, at most every
`flush_every_s` seconds and at the end; tensorboardX writes its event file to gs:// itself (google-cloud-storage).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from phi_jax.paths import is_url, user_path

log = logging.getLogger("phi_jax")

SHOWN = ("loss", "val_loss", "tokens_per_sec", "mfu")  # on the console, in this order


class MetricsWriter:
    """Writes on process 0 only; other processes get a writer that does nothing."""

    def __init__(self, workdir: str | os.PathLike, total_steps: int, initial_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        workdir = user_path(workdir)
        self._jsonl = _JsonLines(workdir / "metrics.jsonl")
        self._tb = SummaryWriter(str(workdir / "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                         disable=None, mininterval=1.0)
        self._shown: dict[str, float] = {}  # the bar's latest figures: a validation write keeps the loss
        self._eta: float | None = None  # seconds, from the latest training metrics
        self._console = contextlib.ExitStack()
        if not self._bar.disable:  # a terminal: log records go through tqdm.write, above the bar
            self._console.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, float | int) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        shown = {k: record[k] for k in SHOWN if k in record}
        self._shown.update(shown)
        self._bar.set_postfix({k: f"{self._shown[k]:.4g}" for k in SHOWN if k in self._shown}, refresh=False)
        self._eta = record.get("eta_sec", self._eta)
        if self._bar.disable:  # not a terminal: log a line instead of drawing a bar
            eta = "?" if self._eta is None else tqdm.format_interval(self._eta)  # "?" before the first timed step
            log.info("%s", " ".join([f"step {step} of {self._bar.total}", *(f"{k}={v:.4g}" for k, v in shown.items()),
                                     f"eta {eta}"]))

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self._bar.update(steps)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._console.close()
            self._tb.close()
            self._jsonl.close()


class StepTimer:
    """Seconds per step between log points, measured from `start`: the loop starts it after the first step, whose
    time (the executable's first run, the data pipeline's start) is not throughput."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._mark: tuple[float, int] | None = None  # (time, step)

    def start(self, step: int) -> None:
        self._mark = (self._clock(), step)

    def lap(self, step: int) -> float | None:
        """Seconds per step since the last lap (or the start); None before the start or with no step since."""
        if self._mark is None or step == self._mark[1]:
            return None
        (then, since), now = self._mark, self._clock()
        self._mark = (now, step)
        return (now - then) / (step - since)


class _JsonLines:
    """Appends lines: to a local file directly (line-buffered), to a bucket object by rewriting it whole."""

    def __init__(self, path, flush_every_s: float = 30.0):
        self.path, self.flush_every_s = path, flush_every_s
        if not is_url(path):
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
            return
        self._file = None
        self._text = path.read_text() if path.exists() else ""
        self._flushed = time.monotonic()

    def write(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line)
            return
        self._text += line
        if time.monotonic() - self._flushed >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self._file is None:
            self.path.write_text(self._text)
            self._flushed = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        else:
            self.flush()


def _plain(v):
    v = v.item() if hasattr(v, "item") else v
    return float(v) if isinstance(v, float) else v
