"""orbax checkpoints of a run: the train state and its metadata (architecture, run config, data identity and the
data position: global examples consumed, so any process count can resume it), saved together.

Each step's checkpoint is written asynchronously to a temporary directory and renamed when complete, so a crash
mid-write leaves the previous checkpoints intact and the partial one is never loaded. Readers (generate, export,
evaluate, `from_pretrained(workdir)`) open a workdir read-only: they never create, delete or clean up anything, so
looking at a run while it trains cannot remove the trainer's in-progress checkpoint.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from phi_jax.config import Compute, PhiConfig, as_dtype
from phi_jax.paths import user_path

log = logging.getLogger("phi_jax")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, file-size limit, ...); the previous ones are intact."""


class Checkpointer:
    """The trainer's checkpoints (`read_only=False`: it creates the directory and removes a crashed write's
    temporary directories) or a reader's view of them (`read_only=True`: saving is refused, nothing is touched)."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = user_path(workdir) / "checkpoints"  # local or gs:// (orbax takes epath paths)
        self.read_only = read_only
        if not read_only and self.directory.is_dir() and (
                partial := sorted(p.name for p in self.directory.iterdir() if "tmp" in p.name)):
            log.warning("ignoring incomplete checkpoint(s) %s in %s (a crash during a write); they are removed",
                        partial, self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=not read_only, cleanup_tmp_directories=not read_only,
                                               read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._failed = False

    def _write_failed(self, e: Exception) -> CheckpointWriteError:
        self._failed = True
        complete = [s for s in self.manager.all_steps() if (self.directory / str(s)).is_dir()]
        kept = f"the newest complete checkpoint, step {max(complete)}, is intact" if complete else \
            "no earlier checkpoint exists"
        return CheckpointWriteError(f"Writing a checkpoint to {self.directory} failed; {kept}. Free space (or raise "
                                    "the quota / file-size limit) and run the same command again to resume. Cause: "
                                    + " ".join(str(e).split()))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        if self.read_only:
            raise PermissionError(f"{self.directory} was opened read-only; only the trainer writes checkpoints.")
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        try:  # an asynchronous write's failure surfaces here (at the next save) or in close()
            self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:
            raise self._write_failed(e) from e

    def data_position(self, step: int, meta: dict) -> int:
        """Global examples the run had consumed at `step` (every checkpoint the trainer writes records it)."""
        if "data_position" not in meta:
            raise ValueError(f"The checkpoint at {self.directory / str(step)} records no data position: the trainer "
                             "did not write it, so it cannot be resumed. Use a new --workdir; "
                             f"--config.init_from_hf={self.directory.parent} starts from its parameters.")
        return int(meta["data_position"])

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_architecture(self, step: int, cfg: PhiConfig, compute: Compute) -> dict:
        """The checkpoint's metadata, after checking that it holds `cfg`'s architecture with parameters of
        `compute.param_dtype` (a resumed run restores its parameters and optimizer moments as they were saved:
        changing their dtype on the way would be a silent cast of the whole state, so it is refused)."""
        meta = self.read_meta(step)
        where = self.directory / str(step)
        if (saved := PhiConfig.from_dict(meta["model"])) != cfg:
            raise ValueError(f"The checkpoint at {where} belongs to a different architecture (checkpoint vs run: "
                             + "; ".join(saved.diff(cfg)) + "). Use a new --workdir, or the config that wrote it.")
        stored = saved_param_dtype(meta)
        if stored is None:
            log.warning("the checkpoint at %s does not record its param_dtype; assuming it is %s", where,
                        compute.param_dtype.name)
        elif stored != compute.param_dtype:
            raise ValueError(f"The checkpoint at {where} holds {stored.name} parameters but the run has "
                             f"param_dtype={compute.param_dtype.name}; resuming does not cast the train state. Set "
                             f"--config.param_dtype={stored.name}, or start a new --workdir from it with "
                             f"--config.init_from_hf={self.directory.parent} (parameters cast on loading).")
        return meta

    def restore(self, step: int, abstract_state):
        """The train state, restored into `abstract_state` (ShapeDtypeStructs with shardings: any mesh)."""
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
            "state"]

    def close(self) -> None:
        """Waits for the last asynchronous write (so it is durable), then releases the manager."""
        reported = self._failed
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            if not reported:  # a failure already raised from save() is not raised a second time
                raise self._write_failed(e) from e
        finally:
            self.manager.close()


def saved_param_dtype(meta: dict):
    """The dtype a checkpoint's parameters were saved in (its run config's param_dtype), or None when it records
    none."""
    name = meta.get("run", {}).get("param_dtype")
    return None if name is None else as_dtype(name, "the checkpoint's param_dtype")


def read_meta(workdir: str | os.PathLike, step: int | None = None) -> dict:
    """The metadata (model, run config, data identity) of a workdir's newest (or chosen) checkpoint, read-only."""
    ckpt, steps = _checkpoint_steps(workdir)
    try:
        return ckpt.read_meta(_choose(ckpt, steps, step))
    finally:
        ckpt.close()


def _checkpoint_steps(workdir: str | os.PathLike) -> tuple[Checkpointer, list[int]]:
    directory = user_path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} is not a training workdir: it has no checkpoints/ directory.")
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    steps = sorted(ckpt.all_steps())
    if not steps:
        ckpt.close()
        raise FileNotFoundError(f"{directory} holds no complete checkpoint.")
    return ckpt, steps


def _choose(ckpt: Checkpointer, steps: list[int], step: int | None) -> int:
    """`step`, or the newest when None; a step without a complete checkpoint is an error listing the others."""
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(f"No checkpoint at step {step} in {ckpt.directory}; available steps: {steps}.")
    return step


def load_model(workdir: str | os.PathLike, step: int | None = None, compute: Compute = Compute()):
    """(model, meta, step): the model of a workdir's newest (or chosen) checkpoint, without the optimizer state.

    Only the "params" subtree of the train state is read (an orbax partial restore), in the dtype it was saved in,
    then cast to `compute.param_dtype` (a reader chooses how to run a model: bf16 inference of an fp32 run).
    """
    from flax import nnx

    from phi_jax.model import abstract_model

    ckpt, steps = _checkpoint_steps(workdir)
    try:
        step = _choose(ckpt, steps, step)
        meta = ckpt.read_meta(step)
        cfg = PhiConfig.from_dict(meta["model"])
        stored = saved_param_dtype(meta)  # (a numpy dtype is falsy: compare with None)
        stored = compute.param_dtype if stored is None else stored
        target = nnx.to_pure_dict(nnx.state(abstract_model(cfg, Compute(param_dtype=stored)), nnx.Param))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)}
        restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True)
        params = ckpt.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]
    finally:
        ckpt.close()
    graphdef, state = nnx.split(abstract_model(cfg, compute), nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x.astype(compute.param_dtype), params))
    model = nnx.merge(graphdef, state)
    log.info("loaded %s step %d (%s params)", ckpt.directory, step, compute.param_dtype.name)
    return model, meta, step
