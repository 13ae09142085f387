"""orbax checkpoints of a run: the train state and its metadata (architecture, run config, data identity and the
data position: global examples consumed, so any process count can resume it), saved together.

Each step's checkpoint is written asynchronously to a temporary directory and renamed when complete, so a crash
mid-write leaves the previous checkpoints intact and the partial one is never loaded. Readers (generate, export,
evaluate, `from_pretrained(workdir)`) open a workdir read-only: they never create, delete or clean up anything, so
looking at a run while it trains cannot remove the trainer's in-progress checkpoint.

A complete checkpoint damaged afterwards (a file removed or truncated, an empty step directory) is found before it
is used (`damage`: its metadata parses, and every array value its OCDBT index points to lies inside an existing
file; no array data is read). The trainer moves it aside, one warning, to `<workdir>/damaged_checkpoints/` and
resumes from the newest intact step; a reader skips to the newest intact step with a warning and changes nothing.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import orbax.checkpoint as ocp

from phi_jax.config import Compute, PhiConfig, as_dtype
from phi_jax.paths import user_path

log = logging.getLogger("phi_jax")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, file-size limit, ...); the previous ones are intact."""


class DamagedCheckpointError(ValueError):
    """No intact checkpoint to use, or the chosen one is damaged: the message names each step and why."""


def _damage(step_dir) -> str | None:
    """Why the orbax checkpoint directory `step_dir` is damaged, or None (see Checkpointer.damage)."""
    if not step_dir.is_dir():
        return "its directory is missing"
    if not any(step_dir.iterdir()):
        return "its directory is empty"
    for item, name in (("meta", "metadata"), ("state", "_METADATA")):
        path = step_dir / item / name
        if not path.is_file():
            return f"{item}/{name} is missing"
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"{item}/{name} is not valid JSON ({e})"
        if not isinstance(content, dict) or (item == "state" and "tree_metadata" not in content):
            return f"{item}/{name} is not an orbax checkpoint's {'metadata' if item == 'meta' else 'tree'}"
        if item == "state":
            tree = content
    if tree.get("use_ocdbt", True):
        return _ocdbt_damage(step_dir / "state", tree)
    return None


def _ocdbt_damage(state_dir, tree: dict) -> str | None:
    """Walks the OCDBT index of a saved pytree (its manifest, then every B+tree node): every value it points to
    must lie within an existing data file, and every array of the tree must have its entries."""
    import tensorstore as ts

    if not (state_dir / "manifest.ocdbt").is_file():
        return "state/manifest.ocdbt is missing"
    url = str(state_dir) if "://" in str(state_dir) else f"file://{state_dir}"
    kv = ts.KvStore.open(url.rstrip("/") + "/").result()
    try:
        manifest = ts.ocdbt.dump(kv).result()
    except ValueError as e:
        return f"state/manifest.ocdbt cannot be read ({' '.join(str(e).split())[:160]})"
    root = manifest["versions"][-1]["root"] if manifest.get("versions") else {}
    sizes: dict[str, int | None] = {}

    def outside(location: str) -> str | None:  # "<kind>:<base>:<file>:<offset>:<length>", relative to state_dir
        _, base, name, offset, length = location.rsplit(":", 4) if location.count(":") >= 4 else ("", "", "", 0, 0)
        rel = f"{base}{name}"
        if rel not in sizes:
            path = state_dir / rel
            sizes[rel] = path.stat().length if path.is_file() else None
        if sizes[rel] is None:
            return f"state/{rel} is missing"
        if sizes[rel] < int(offset) + int(length):
            return f"state/{rel} is truncated ({sizes[rel]} bytes, data up to byte {int(offset) + int(length)})"
        return None

    keys: set[str] = set()
    pending = [root["location"]] if "location" in root else []
    while pending:
        location = pending.pop()
        if why := outside(location):
            return why
        try:
            node = ts.ocdbt.dump(kv, location).result()
        except ValueError as e:
            return f"an index node of state/ cannot be read ({' '.join(str(e).split())[:160]})"
        for entry in node.get("entries", []):
            for value in entry.values():
                if isinstance(value, str) and value.startswith("btreenode:"):
                    pending.append(value)
                elif isinstance(value, str) and value.startswith("value:") and (why := outside(value)):
                    return why
            if isinstance(entry.get("key"), bytes):
                keys.add(entry["key"].decode("utf-8", "replace").split("/")[0])
    names = {".".join(str(k["key"]) for k in m["key_metadata"]) for m in tree["tree_metadata"].values()
             if m["value_metadata"].get("value_type") in ("jax.Array", "np.ndarray")
             and not m["value_metadata"].get("skip_deserialize")}
    if missing := sorted(names - keys):
        return f"state/ lacks the data of {len(missing)} array(s), e.g. {missing[0]} (its index is incomplete)"
    return None


class Checkpointer:
    """The trainer's checkpoints (`read_only=False`: it creates the directory and removes a crashed write's
    temporary directories) or a reader's view of them (`read_only=True`: saving is refused, nothing is touched)."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = user_path(workdir) / "checkpoints"  # local or gs:// (orbax takes epath paths)
        self.read_only = read_only
        self._damage: dict[int, str | None] = {}  # step -> why it is damaged (None: intact), checked once
        if not read_only and self.directory.is_dir():
            if partial := sorted(p.name for p in self.directory.iterdir() if "tmp" in p.name):
                log.warning("ignoring incomplete checkpoint(s) %s in %s (a crash during a write); they are removed",
                            partial, self.directory)
            self._set_aside_damaged()  # before orbax lists the steps
        if not read_only and jax.process_count() > 1:  # every process lists the steps after process 0 moved any
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("phi_jax: damaged checkpoints set aside")
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

    def damage(self, step: int) -> str | None:
        """Why the checkpoint of `step` cannot be restored (a missing or truncated file, an empty directory), or
        None when it is intact. Reads its metadata and OCDBT index (kilobytes), never its array data; a byte
        changed inside an array's data is not seen here (orbax keeps no checksum of it)."""
        if step not in self._damage:
            try:
                self._damage[step] = _damage(self.directory / str(step))
            except Exception as e:  # an unreadable store (permissions, a bucket's error) is damage too
                self._damage[step] = f"it cannot be read: {' '.join(str(e).split())[:200]}"
        return self._damage[step]

    def newest_intact_step(self, steps: list[int] | None = None) -> int | None:
        """The newest of `steps` (default: all) whose checkpoint is intact, after one warning naming any newer
        damaged ones; None (and a warning) when none is intact. Read-only: nothing is moved."""
        steps = sorted(self.all_steps() if steps is None else steps, reverse=True)
        damaged = []
        for step in steps:
            if (why := self.damage(step)) is None:
                if damaged:
                    log.warning("skipping damaged checkpoint(s) in %s: %s; using step %d", self.directory,
                                "; ".join(f"step {s}: {w}" for s, w in damaged), step)
                return step
            damaged.append((step, why))
        return None

    def _set_aside_damaged(self) -> None:
        """The trainer's start: damaged checkpoints newer than the newest intact one are moved to
        <workdir>/damaged_checkpoints/ (never deleted), with one warning. When none is intact, the run stops
        (rather than start again from step 0 unasked): running it again starts afresh."""
        steps = sorted((int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir()),
                       reverse=True)
        damaged = []
        for step in steps:
            if (why := self.damage(step)) is None:
                break
            damaged.append((step, why))
        if not damaged:
            return
        aside = self._move_aside([s for s, _ in damaged])
        what = "; ".join(f"step {s}: {w}" for s, w in damaged)
        if len(damaged) == len(steps):
            raise DamagedCheckpointError(
                f"No intact checkpoint in {self.directory}: {what}. They were moved to {aside}/. Run the same "
                "command again to start from step 0, or put a good copy back.")
        log.warning("damaged checkpoint(s) in %s: %s; moved to %s/; resuming from step %d", self.directory, what,
                    aside, steps[len(damaged)])

    def _move_aside(self, steps: list[int]):
        """Moves the step directories to <workdir>/damaged_checkpoints/STEP (STEP-1, ... if taken); returns it."""
        import jax

        aside = self.directory.parent / "damaged_checkpoints"
        if jax.process_index() == 0:  # every process finds the same damage; one moves it
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target, n = aside / str(step), 1
                while target.exists():
                    target, n = aside / f"{step}-{n}", n + 1
                (self.directory / str(step)).rename(target)
        return aside

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
        """The train state, restored into `abstract_state` (ShapeDtypeStructs with shardings: any mesh). A
        checkpoint that fails to restore (damage `damage` cannot see) is an error; the trainer moves it aside first,
        so that the same command resumes from the previous one."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as e:
            raise self._unrestorable(step, e) from None

    def _unrestorable(self, step: int, e: Exception) -> DamagedCheckpointError:
        cause = " ".join(str(e).split())[:300]
        if self.read_only:
            return DamagedCheckpointError(f"Restoring step {step} from {self.directory} failed: {cause}. The "
                                          "checkpoint is damaged: choose another step, or put a good copy back.")
        aside = self._move_aside([step])
        return DamagedCheckpointError(f"Restoring step {step} from {self.directory} failed: {cause}. The "
                                      f"checkpoint is damaged and was moved to {aside}/; run the same command again "
                                      "to resume from the previous checkpoint.")

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
    """`step`, or the newest intact one when None (a warning names any newer damaged ones); a step without a
    complete checkpoint, or a damaged one, is an error naming the others."""
    if step is None:
        if (chosen := ckpt.newest_intact_step(steps)) is None:
            raise DamagedCheckpointError(f"No intact checkpoint in {ckpt.directory}: " + "; ".join(
                f"step {s}: {ckpt.damage(s)}" for s in reversed(steps)) + ". Put a good copy back, or train again.")
        return chosen
    if step not in steps:
        raise ValueError(f"No checkpoint at step {step} in {ckpt.directory}; available steps: {steps}.")
    if why := ckpt.damage(step):
        raise DamagedCheckpointError(f"The checkpoint of step {step} in {ckpt.directory} is damaged: {why}. Choose "
                                     f"another step ({[s for s in steps if s != step]}) or put a good copy back.")
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
        try:
            params = ckpt.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]
        except Exception as e:
            raise ckpt._unrestorable(step, e) from None
    finally:
        ckpt.close()
    graphdef, state = nnx.split(abstract_model(cfg, compute), nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x.astype(compute.param_dtype), params))
    model = nnx.merge(graphdef, state)
    log.info("loaded %s step %d (%s params)", ckpt.directory, step, compute.param_dtype.name)
    return model, meta, step
