"""Where metrics go: metrics.jsonl and TensorBoard in the workdir, a progress bar on the console (process 0)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

log = logging.getLogger("phi_jax")


class MetricsWriter:
    """Writes on process 0 only; other processes get a writer that does nothing."""

    def __init__(self, workdir: str | os.PathLike, total_steps: int, initial_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        workdir = Path(workdir)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._tb = SummaryWriter(str(workdir / "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                         disable=None, mininterval=1.0)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, float | int) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        shown = {k: record[k] for k in ("loss", "val_loss", "tokens_per_sec", "mfu") if k in record}
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        if self._bar.disable:  # not a terminal: log a line instead of drawing a bar
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self._bar.update(steps)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
            self._jsonl.close()


def _plain(v):
    v = v.item() if hasattr(v, "item") else v
    return float(v) if isinstance(v, float) else v
