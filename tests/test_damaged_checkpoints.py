"""A damaged newest checkpoint (real orbax checkpoints of the tiny model, damaged on disk) does not stop a run:
the trainer moves it aside with one warning and resumes from the newest intact step, bit for bit like an
uninterrupted run from there; readers skip to that step and change nothing (tests/test_bad_input.py holds the
table of every file and damage, read by a reader)."""

from __future__ import annotations

import logging
import shutil

import pytest
from bad_input import damage
from runs import losses, make_shards, tiny_config

from phi_jax.checkpoint import Checkpointer, DamagedCheckpointError, load_model
from phi_jax.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


def config(shards, **kw):
    return tiny_config(shards, **{"eval_every": 0, "log_every": 1, "checkpoint_every": 2, **kw})


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A run of 6 steps with checkpoints 2, 4, 6, and its losses; each test damages a copy."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(config(shards, total_steps=6), run)
    return run, losses(run)


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


def _data_file(step_dir):
    return max(step_dir.glob("state/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "phi_jax"]


def test_the_trainer_sets_damaged_checkpoints_aside_and_resumes_from_the_newest_intact_one(shards, trained, run,
                                                                                            caplog):
    ckpts = run / "checkpoints"
    damage(_data_file(ckpts / "6"), "truncated")  # the newest: a data file cut short (a partial copy, a full disk)
    (ckpts / "4" / "meta" / "metadata").unlink()  # the one before: its metadata gone
    (ckpts / "8").mkdir()  # and a newer, empty step directory: what a copy interrupted at its start leaves
    caplog.set_level(logging.INFO, logger="phi_jax")

    train(config(shards, total_steps=6), run)

    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"damaged checkpoint(s) in {ckpts}: step 8: its directory is empty; step 6: "
                                  "state/ocdbt.process_0/d/")
    assert "is truncated" in warnings[0] and "step 4: meta/metadata is missing" in warnings[0]
    assert warnings[0].endswith(f"moved to {run / 'damaged_checkpoints'}/; resuming from step 2")
    assert sorted(p.name for p in (run / "damaged_checkpoints").iterdir()) == ["4", "6", "8"]  # set aside, kept
    assert f"resumed from {ckpts} at step 2" in caplog.messages
    assert losses(run) == trained[1]  # steps 3..6 again, from step 2: bit for bit the uninterrupted run's
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4, 6]


def test_no_intact_checkpoint_stops_the_trainer_in_one_line_and_a_rerun_starts_afresh(run):
    for step in (2, 4, 6):
        (run / "checkpoints" / str(step) / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(DamagedCheckpointError, match=rf"^No intact checkpoint in {run / 'checkpoints'}: step 6: "
                                                     r"state/manifest.ocdbt is missing; step 4: .*; step 2: .*\. They "
                                                     r"were moved to .*damaged_checkpoints/\. Run the same command "
                                                     r"again to start from step 0, or put a good copy back\.$"):
        Checkpointer(run)
    assert Checkpointer(run, read_only=True).all_steps() == []  # a rerun starts from step 0


def test_a_reader_skips_a_damaged_newest_checkpoint_and_changes_nothing(run, caplog):
    chunk = _data_file(run / "checkpoints" / "6")
    damage(chunk, "missing")
    listing = sorted(p.relative_to(run) for p in run.rglob("*"))
    caplog.set_level(logging.WARNING, logger="phi_jax")
    _, meta, step = load_model(run)  # generate, evaluate, export, from_pretrained(workdir)
    assert step == 4 and meta["data_position"] == 4 * 8
    assert _warnings(caplog) == [f"skipping damaged checkpoint(s) in {run / 'checkpoints'}: step 6: "
                                 f"state/ocdbt.process_0/d/{chunk.name} is missing; using step 4"]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == listing  # read-only: nothing moved
    with pytest.raises(DamagedCheckpointError, match=r"The checkpoint of step 6 .* is damaged: state/.* is missing\. "
                                                     r"Choose another step \(\[2, 4\]\)"):
        load_model(run, step=6)


def test_a_checkpoint_that_fails_to_restore_is_set_aside_by_the_trainer(run, monkeypatch):
    """Damage the index check cannot see surfaces in orbax's restore: one error, and the trainer moves the step
    aside so that the same command resumes from the previous one (simulated: orbax's restore raises)."""
    ckpt = Checkpointer(run)

    def fail(*a, **k):
        raise ValueError("DATA_LOSS: Error reading chunk\n  (tensorstore's words)")

    monkeypatch.setattr(ckpt.manager, "restore", fail)
    with pytest.raises(DamagedCheckpointError, match=r"^Restoring step 6 from .* failed: DATA_LOSS: Error reading "
                                                     r"chunk \(tensorstore's words\)\. The checkpoint is damaged and "
                                                     r"was moved to .*damaged_checkpoints/; run the same command "
                                                     r"again to resume from the previous checkpoint\.$"):
        ckpt.restore(6, None)
    ckpt.close()
    assert Checkpointer(run, read_only=True).all_steps() == [2, 4]
