"""Helpers for tests that run `python -m phi_jax.train` as real subprocesses on small stdlib shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from phi_jax.data.corpus import stdlib_files
from phi_jax.data.prepare import prepare_shards
from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--config.model=tiny", "--config.seq_len=32", "--config.batch_size=8", "--config.log_every=1",
            "--config.eval_every=0", "--config.learning_rate=3e-3", "--config.checkpoint_every=3"]


def documents(n: int) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in stdlib_files()[:n]]


def make_shards(root: Path) -> Path:
    """~150k tokens of stdlib source with a 512-piece SentencePiece model (fits the `tiny` model's embedding)."""
    sp = train_sentencepiece(documents(40), root / "sp512", vocab_size=512)
    prepare_shards(documents(40), load_tokenizer(sp), root / "shards", val_fraction=0.1, docs_per_shard=20, workers=1)
    return root / "shards"


def clean_env(**extra: str) -> dict[str, str]:
    """A CPU-only environment for a subprocess. It skips the entry points' huge-page restart, which would import
    JAX twice in every subprocess (test_host_memory.py tests the restart itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHI_JAX_", "XLA_FLAGS"))}
    return {**env, "JAX_PLATFORMS": "cpu", "PHI_JAX_HUGE_PAGES": "0", **extra}


def train_cmd(workdir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "phi_jax.train", "--config=configs/quickstart.py", f"--workdir={workdir}", *flags]


def run_cli(workdir: Path, *flags: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(workdir, *flags), cwd=ROOT, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (re-run after a crash) keeps its last value."""
    return {r["step"]: r["loss"] for r in metrics(workdir) if "loss" in r}


def tiny_config(shards: Path, **overrides):
    """The run config of an in-process `train()` on the tiny model; overrides by dotted key ("data.packing")."""
    from phi_jax.run_config import base_config

    c = base_config()
    c.model, c.seq_len, c.batch_size, c.total_steps = "tiny", 32, 8, 2
    c.data.path = str(shards)
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c
