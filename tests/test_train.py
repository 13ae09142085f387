"""`python -m phi_jax.train` end to end: real subprocesses on real (small) token shards of stdlib code."""

from __future__ import annotations

import importlib.util
import logging
import re
import shlex
from pathlib import Path

import pytest
from runs import ROOT, TINY_RUN, documents, losses, make_shards, metrics, run_cli, tiny_config

from phi_jax.data.prepare import prepare_shards
from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from phi_jax.run_config import base_config
from phi_jax.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data"))


def test_every_config_parses_and_has_the_recipe():
    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.name == "__init__.py":
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
        for key in ("total_steps", "checkpoint_every", "log_every", "seed", "batch_size", "seq_len", "learning_rate"):
            assert key in c, (path.name, key)
        assert set(c.keys()) == set(base_config().keys()), path.name  # no config invents keys
    from configs.phi15 import get_config

    c = get_config()
    assert (c.model, c.learning_rate, c.warmup_steps, c.b1, c.b2, c.eps, c.weight_decay) == \
        ("phi-1.5", 2e-4, 0, 0.9, 0.98, 1e-7, 0.1)
    assert (c.batch_size, c.seq_len, c.grad_clip_norm) == (2048, 2048, 0.0)


@pytest.mark.parametrize("flag,message", [
    ("--config.lerning_rate=1e-3", "--config.lerning_rate is not a run-config key; did you mean "
                                   "--config.learning_rate?"),
    ("--config.keep_checkpoints=0", "--config.keep_checkpoints=0 must be >= 1."),
], ids=["misspelt-key", "bad-value"])
def test_a_bad_config_on_the_command_line_is_one_line(tmp_path, flag, message):
    result = run_cli(tmp_path, flag, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "host memory" not in line]
    assert len(errors) == 1 and message in errors[0], result.stderr  # no traceback
    assert not (tmp_path / "checkpoints").exists()


def test_resumed_run_matches_uninterrupted_run_bitwise(tmp_path, shards):
    """6 steps in one go versus 3 steps, exit, 3 more: every loss identical, bit for bit (CPU is deterministic)."""
    data = [f"--config.data.path={shards}", *TINY_RUN]
    whole, split = tmp_path / "whole", tmp_path / "split"
    for workdir, steps in [(whole, 6), (split, 3), (split, 6)]:
        result = run_cli(workdir, *data, f"--config.total_steps={steps}")
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    expected, got = losses(whole), losses(split)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4, 5, 6]
    assert got == expected  # exact float equality, including the steps after the restart
    assert expected[6] < expected[1]
    steps = sorted(int(p.name) for p in (split / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert any((split / "tensorboard").iterdir())


def test_validation_loss_falls(tmp_path, shards):
    result = run_cli(tmp_path, f"--config.data.path={shards}", *TINY_RUN, "--config.total_steps=30",
                     "--config.eval_every=30", "--config.eval_batches=2", "--config.checkpoint_every=30")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[1] < 0.8 * val[0], val
    logged = [r for r in rows if "loss" in r]
    assert all({"step", "loss", "grad_norm", "learning_rate"} <= set(r) for r in logged)
    assert "tokens_per_sec" not in logged[0]  # the first step warms up: throughput is timed from after it
    assert all({"tokens_per_sec", "mfu", "step_time", "eta_sec"} <= set(r) for r in logged[1:])
    # Each lap ends when its step has run: no MFU above the (nominal CPU) peak, not even the first timed step's.
    assert all(0 < r["mfu"] < 1 for r in logged[1:]), [r["mfu"] for r in logged[1:4]]


def test_a_run_outside_a_terminal_logs_step_of_total_eta_and_a_summary(tmp_path, shards, caplog):
    """The log lines a run writes to a file or a pipe, and its summary: the final losses, the newest checkpoint
    and the export and generate commands, whose flags those entry points define."""
    caplog.set_level(logging.INFO, logger="phi_jax")
    workdir = tmp_path / "run"
    last = train(config(shards, total_steps=3, log_every=1, eval_every=3, eval_batches=1, checkpoint_every=3),
                 workdir)
    steps = [m for m in caplog.messages if m.startswith("step ")]
    assert re.fullmatch(r"step 0 of 3 val_loss=\S+ eta \?", steps[0]), steps
    assert re.fullmatch(r"step 1 of 3 loss=\S+ eta \?", steps[1]), steps  # the first step is not timed
    assert re.fullmatch(r"step 2 of 3 loss=\S+ tokens_per_sec=\S+ mfu=\S+ eta \d\d:\d\d", steps[2]), steps
    summary = caplog.messages[-1].splitlines()
    assert summary[0] == f"finished at step 3 of 3: loss {last['loss']:.4f}, val_loss {last['val_loss']:.4f}"
    checkpoint = workdir / "checkpoints" / "3"
    assert summary[1] == f"  newest checkpoint: {checkpoint}" and checkpoint.is_dir()
    commands = {line.split(": ", 1)[0].strip(): shlex.split(line.split(": ", 1)[1]) for line in summary[2:]}
    assert commands["export to Hugging Face"][:4] == ["python", "-m", "tools.export_hf", f"--model={workdir}"]
    assert commands["generate"][:4] == ["python", "-m", "phi_jax.generate", f"--model={workdir}"]
    for command in commands.values():
        source = (ROOT / (command[2].replace(".", "/") + ".py")).read_text()
        for flag in command[3:]:
            assert f'"{flag.split("=")[0]}"' in source, flag  # a flag that entry point defines


def config(shards: Path, **overrides):
    return tiny_config(shards, **overrides)


@pytest.mark.parametrize("overrides,error,match", [
    ({"data.path": "/nonexistent/shards"}, FileNotFoundError, "does not exist"),
    ({"seq_len": 4096}, ValueError, "max_position_embeddings"),
    ({"batch_size": 12}, ValueError, "not divisible by the 8 data-parallel devices"),
    ({"micro_batch_per_device": 3}, ValueError, "micro_batch_per_device"),
    ({"sharding": "zero3"}, ValueError, "sharding='zero3' must be one of"),
], ids=["missing-data", "seq-too-long", "batch-vs-devices", "micro-batch", "strategy"])
def test_bad_input_fails_before_compiling(tmp_path, shards, overrides, error, match):
    with pytest.raises(error, match=match):
        train(config(shards, **overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_empty_data_dir_and_foreign_tokenizer(tmp_path, shards):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        train(config(shards, **{"data.path": str(tmp_path / "empty")}), tmp_path / "run")
    other = train_sentencepiece(documents(10), tmp_path / "other", vocab_size=512)
    with pytest.raises(ValueError, match="tokenizer"):
        train(config(shards, **{"data.tokenizer": str(other)}), tmp_path / "run")


def test_tokenizer_larger_than_the_embedding(tmp_path):
    sp = train_sentencepiece(documents(40), tmp_path / "sp1000", vocab_size=1000)
    prepare_shards(documents(40), load_tokenizer(sp), tmp_path / "shards", val_fraction=0.1, workers=1)
    with pytest.raises(ValueError, match="1000"):
        train(config(tmp_path / "shards"), tmp_path / "run")


def test_workdir_of_another_architecture_is_refused(tmp_path, shards):
    workdir = tmp_path / "run"
    result = run_cli(workdir, f"--config.data.path={shards}", *TINY_RUN, "--config.total_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    c = config(shards, model="quickstart")
    with pytest.raises(ValueError, match="different architecture"):
        train(c, workdir)


def test_fine_tuning_with_init_from_hf(tmp_path, shards):
    """--config.init_from_hf trains from the Hugging Face weights: its first logged loss is the loss those weights
    give the first batch (a plain forward pass of the exported model), and a fresh run's is not."""
    import numpy as np
    import optax

    from phi_jax import from_pretrained
    from phi_jax.config import PhiConfig
    from phi_jax.data.training_data import resolve_data
    from phi_jax.hf import save_pretrained
    from phi_jax.model import init_model

    # Large initial weights: a loss far from a fresh model's ln(vocab) (the init std is not architecture).
    save_pretrained(init_model(PhiConfig.preset("tiny", initializer_range=0.5), seed=3), tmp_path / "hf")
    run = [f"--config.data.path={shards}", *TINY_RUN, "--config.total_steps=2"]
    direct = run_cli(tmp_path / "direct", *run, f"--config.init_from_hf={tmp_path / 'hf'}")
    assert direct.returncode == 0, direct.stderr[-3000:]
    assert run_cli(tmp_path / "fresh", *run).returncode == 0
    c = tiny_config(shards)
    first = next(iter(resolve_data(c).train_dataset(c)))
    logits, _ = from_pretrained(tmp_path / "hf")(first["inputs"], first["positions"],
                                                 segment_ids=first["segment_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(np.asarray(logits), first["targets"])
    expected = float((nll * first["loss_mask"]).sum() / first["loss_mask"].sum())
    assert losses(tmp_path / "direct")[1] == pytest.approx(expected, rel=1e-5)
    assert losses(tmp_path / "fresh")[1] == pytest.approx(np.log(512), rel=0.02) != pytest.approx(expected, rel=0.1)
