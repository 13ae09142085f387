"""orbax checkpoints of a run: train state, data iterator position and the run's configs, saved together.

Each step's checkpoint is written asynchronously to a temporary directory and renamed when complete, so a crash
mid-write leaves the previous checkpoints intact and the partial one is never loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grain
import orbax.checkpoint as ocp

from phi_jax.config import PhiConfig, architecture_diff

log = logging.getLogger("phi_jax")


class Checkpointer:
    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        if self.directory.is_dir() and (partial := sorted(p.name for p in self.directory.iterdir() if "tmp" in p.name)):
            log.warning("ignoring incomplete checkpoint(s) %s in %s (a crash during a write); they are removed",
                        partial, self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, meta: dict) -> None:
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_architecture(self, step: int, cfg: PhiConfig) -> dict:
        """The checkpoint's metadata, after checking it belongs to the same architecture as `cfg`."""
        meta = self.read_meta(step)
        if diff := architecture_diff(meta["model"], cfg):
            raise ValueError(f"The checkpoint at {self.directory / str(step)} belongs to a different architecture ("
                             + "; ".join(diff) + "). Use a new --workdir, or the config that wrote it.")
        return meta

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores into `abstract_state` (ShapeDtypeStructs with shardings) and, if given, the data iterator."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
