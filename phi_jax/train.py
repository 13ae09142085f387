"""Train phi: `python -m phi_jax.train --config=configs/phi15.py --workdir=DIR [--config.KEY=VALUE ...]`.

Restarting the same command with the same workdir resumes from the newest complete checkpoint.
"""


from __future__ import annotations

if __name__ == "__main__":  # SIGTERM/SIGINT while starting: nothing to save yet, exit 75 (docs/RELIABILITY.md)
    from phi_jax.cli import exit_on_signals_during_startup

    exit_on_signals_during_startup(75)

import dataclasses
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from phi_jax import cli, distributed, memory_check, restart, validate
from phi_jax.checkpoint import Checkpointer, CheckpointWriteError
from phi_jax.cli import RunFailure
from phi_jax.config import Compute, PhiConfig
from phi_jax.data.default import CacheDirError
from phi_jax.data.training_data import TrainingData, resolve_data
from phi_jax.flops import flops_per_token, peak_flops_per_device
from phi_jax.lora import from_run_config as lora_from_run_config
from phi_jax.metrics import MetricsWriter, StepTimer
from phi_jax.optim import make_optimizer
from phi_jax.paths import is_url, user_path
from phi_jax.preemption import PREEMPTED_EXIT_CODE, Preemption
from phi_jax.run_config import compute_options
from phi_jax.sharding import make_mesh
from phi_jax.train_state import TrainState, fresh_loss_scale
from phi_jax.trainer import Trainer, build_trainer, lora_meta, lora_resume_base
from phi_jax.workdir_lock import WorkdirLock

log = logging.getLogger("phi_jax")


class NonFiniteError(RunFailure):
    """The loss, a gradient or the parameters stopped being finite."""


def accumulation_steps(c: ml_collections.ConfigDict, mesh) -> int:
    """Micro-batches per optimizer step; every division must be exact."""
    return validate.accumulation_steps(c, mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())


def global_batch(local: dict[str, np.ndarray], accum: int, sharding) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, shaped [accum, micro_batch, seq]."""
    out = {}
    for key, x in local.items():
        x = x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
        shape = (accum, x.shape[1] * jax.process_count(), *x.shape[2:])
        out[key] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out


@jax.jit
def all_finite(params) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


@dataclasses.dataclass
class Run:
    """A run that `setup` has built and checked: everything the loop reads, and the steps it calls."""

    c: ml_collections.ConfigDict
    workdir: Path
    data: TrainingData
    ckpt: Checkpointer
    writer: MetricsWriter
    state: TrainState | None  # restored or freshly initialised; train_loop takes it (its first step donates it)
    batches: Iterator[dict[str, np.ndarray]]  # this process's rows, from the resumed data position on
    step_fn: Callable  # the train step, compiled ahead of time
    eval_fn: Callable
    eval_batches: dict[str, list]  # per source ("" for a single directory); empty when validation is off
    accum: int  # micro-batches per step
    shardings: tuple  # (train batch [accum, micro_batch, seq], eval batch [batch, seq])
    start: int  # the step the state holds
    start_batch: int  # global batches consumed before `start` (the data position)
    saved_step: int | None  # the step the newest durable checkpoint holds
    meta: dict  # what every checkpoint records: model, run config, data identity
    flops: tuple[float, float | None]  # (FLOPs per token, peak FLOP/s per device; None: unknown, no MFU)

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return global_batch(local, self.accum, self.shardings[0])

    def log_metrics(self, step: int, state: TrainState, metrics: dict, step_time: float | None) -> dict[str, float]:
        """The step's metrics plus throughput (once a step time is known), written to every sink."""
        c, (fpt, peak) = self.c, self.flops
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if step_time is not None:
            tokens_per_sec = c.batch_size * c.seq_len / step_time
            metrics.update(step_time=step_time, tokens_per_sec=tokens_per_sec,
                           eta_sec=step_time * (c.total_steps - step))
            if peak:  # an accelerator without a spec-sheet peak has no MFU (phi_jax.flops.peak_flops_per_device)
                metrics["mfu"] = tokens_per_sec * fpt / (peak * jax.device_count())
        metrics["total_skipped"] = float(state.total_skipped)
        metrics.update(self.data.tokens_seen(step * c.batch_size, c.seq_len))  # tokens/<source> of a mixture
        if metrics["skipped"]:
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step,
                        int(metrics["consecutive_skips"]))
        self.writer.write(step, metrics)
        return metrics

    def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
        """Validation loss of every source (val_loss, and val_loss/<source> for a mixture), written to every sink."""
        per_process = self.c.batch_size // self.accum // jax.process_count()
        rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
        losses = {}
        for name, batches in self.eval_batches.items():
            total = tokens = 0.0
            for b in batches:
                sharded = {k: jax.make_array_from_process_local_data(self.shardings[1], v[rows], v.shape)
                           for k, v in b.items()}
                t, n = self.eval_fn(state, sharded)
                total, tokens = total + float(t), tokens + float(n)
            losses[name] = total / max(tokens, 1.0)
        val = self.data.val_metrics(losses)
        self.writer.write(step, val)
        return val

    def save(self, state: TrainState, step: int) -> None:
        """Checkpoints `step` with its data position; non-finite parameters never overwrite the last good state."""
        if not bool(all_finite(state.params)):
            raise NonFiniteError(f"Parameters are not finite at step {step}; not checkpointing over the last good "
                                 "state. Lower the learning rate or enable --config.grad_clip_norm.")
        position = (step - self.start + self.start_batch) * self.c.batch_size
        self.ckpt.save(step, Trainer.checkpointed(state), {**self.meta, "data_position": position})
        self.saved_step = step

    def exit_preempted(self, state: TrainState, step: int) -> NoReturn:
        """A signal arrived: checkpoint `step` (unless that is already being written), wait until it is durable and
        exit with status 75."""
        if self.saved_step != step:
            self.save(state, step)
        self.ckpt.close()
        log.warning("preempted: checkpoint of step %d is durable; exiting with %d", step, PREEMPTED_EXIT_CODE)
        sys.exit(PREEMPTED_EXIT_CODE)

    def close(self) -> None:
        self.writer.close()
        self.ckpt.close()  # waits for the asynchronous write: the checkpoint is durable


def train(c: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Runs (or resumes) training; returns the last logged metrics. A SIGTERM/SIGINT exits with status 75."""
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None  # one trainer per workdir
    preemption = Preemption(before_immediate_exit=lock.release if lock is not None else None)
    try:
        run = setup(c, user_path(workdir), lock)
        try:
            last = train_loop(run, preemption)
        finally:
            run.close()
        if jax.process_index() == 0:
            log.info("%s", summary(run, last))
        return last
    finally:
        if lock is not None:
            lock.release()
        preemption.close()


def train_loop(run: Run, preemption: Preemption) -> dict[str, float]:
    """Steps from `run.start` to total_steps: log, validate, checkpoint; a signal checkpoints and exits with 75."""
    c, state, last = run.c, run.state, {}
    run.state = None  # donated by the first step: nothing may read it after
    if run.start == 0 and run.eval_batches:
        last = run.evaluate(state, 0)
    timer = StepTimer()
    for step in range(run.start + 1, c.total_steps + 1):
        if preemption.agreed():
            run.exit_preempted(state, step - 1)
        state, metrics = run.step_fn(state, run.global_batch(next(run.batches)))
        if step == run.start + 1:  # the first step is a warm-up (the executable's first run, the data's start)
            jax.block_until_ready(metrics)
            preemption.trained()  # from now on a signal checkpoints at the next step boundary
            timer.start(step)  # throughput is measured from here
        run.writer.advance()
        if step % c.log_every == 0 or step in (run.start + 1, c.total_steps):
            jax.block_until_ready(metrics)  # the lap ends when this step has run, not when it was dispatched
            last = run.log_metrics(step, state, metrics, timer.lap(step))
        if int(state.skipped) >= c.max_consecutive_skips:
            raise NonFiniteError(f"{int(state.skipped)} consecutive updates had a non-finite loss or gradient "
                                 f"(step {step}); stopping. Lower the learning rate, enable grad clipping, or "
                                 "check the data. The last checkpoint holds the last good state.")
        if run.eval_batches and (step % c.eval_every == 0 or step == c.total_steps):
            last = {**last, **run.evaluate(state, step)}
        if step % c.checkpoint_every == 0 or step == c.total_steps:
            run.save(state, step)
    return last


def setup(c: ml_collections.ConfigDict, workdir: Path, lock: WorkdirLock | None) -> Run:
    """Checks the config, takes the workdir, resolves the data, checks a restart against the newest checkpoint,
    compiles the step and checks the memory, then restores or initialises the state: cheap checks first, nothing
    allocated before it is known to fit."""
    validate.check_values(c)  # every key's type and range, before anything is read, built or compiled
    mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, dcn_data=c.mesh.dcn_data)
    accum = accumulation_steps(c, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    if lock is not None:
        lock.acquire()
    if c.init_from_hf:  # its config and file headers now: its weights are read only after compiling
        from phi_jax.loading import check_readable

        check_readable(c.init_from_hf)
    data = resolve_data(c)  # builds the embedded corpus on first use; checks shards against the tokenizer
    cfg, compute = PhiConfig.preset(c.model), compute_options(c)  # validate.check_values checked seq_len against it
    data.check_model_vocab(cfg.vocab_size)
    tx = make_optimizer(c.learning_rate, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                        warmup_steps=c.warmup_steps, grad_clip_norm=c.grad_clip_norm)
    lora = lora_from_run_config(c)
    log.info("model %s: %.1fM parameters; mesh %s; sharding %s; %d micro-batch(es) per step",
             c.model, cfg.num_params() / 1e6, dict(mesh.shape), c.sharding, accum)

    ckpt = Checkpointer(workdir, max_to_keep=c.keep_checkpoints)
    try:
        trainer = build_trainer(cfg, compute, tx, mesh, c.sharding, lora=lora)
        target = trainer.abstract_state
        latest, saved_meta, start_batch = resume_point(ckpt, c, cfg, compute, data)
        dataset = data.train_dataset(c, jax.process_index(), jax.process_count(), start_batch)
        check_one_batch(dataset, c, data)
        eval_batches = {}  # read before compiling: a validation split too short for one batch is an error here
        if c.eval_every > 0 and c.eval_batches > 0:
            eval_batches = data.eval_batches(c.seq_len, c.batch_size // accum, c.eval_batches)
        memory_check.check_state_fits(target, target.params)  # before compiling or allocating anything
        log.info("compiling the train step")
        compiled_step = trainer.train_step.lower(target, trainer.abstract_batch(accum, c.batch_size // accum,
                                                                                c.seq_len)).compile()
        memory_check.check_compiled_fits(compiled_step)  # still before allocating the state

        if latest is not None:
            state = ckpt.restore(latest, trainer.checkpoint_target)
            if lora is None:
                state = state.with_frozen(None)
            else:  # the checkpoint holds the adapters; the frozen base comes from where it names
                state = lora_resume_base(trainer, state, c, saved_meta, str(ckpt.directory / str(latest)))
            if restart.loss_scale_reset(saved_meta, c):
                log.warning("dtype changed from %s to %s: the loss scale starts afresh", saved_meta["run"]["dtype"],
                            c.dtype)
                state = state.replace(loss_scale=jax.device_put(fresh_loss_scale(compute),
                                                                trainer.shardings.loss_scale))
            log.info("resumed from %s at step %d", ckpt.directory, latest)
        else:
            state = trainer.init_state(c.seed, init_from=c.init_from_hf or None,
                                       adapters_from=c.lora.init_from_peft or None)
        meta = {"model": cfg.to_dict(), "run": c.to_dict(), "data": data.identity()}
        if lora is not None:
            meta["lora"] = lora_meta(lora, c, state.frozen)

        start = int(state.step)
        if start >= c.total_steps:
            log.info("the run is complete at step %d (total_steps=%d); raise --config.total_steps to train further",
                     start, c.total_steps)
        fpt = flops_per_token(cfg, c.seq_len)
        peak, peak_source = peak_flops_per_device(c.peak_flops_per_device)
        log.info("%.3g FLOPs/token (causal attention counted); peak %s per device (%s)", fpt,
                 f"{peak:.3g} FLOP/s" if peak else "unknown", peak_source)
        return Run(c=c, workdir=workdir, data=data, ckpt=ckpt, writer=MetricsWriter(workdir, c.total_steps, start),
                   state=state, batches=iter(dataset), step_fn=compiled_step, eval_fn=trainer.eval_step,
                   eval_batches=eval_batches, accum=accum,
                   shardings=(trainer.batch_sharding, trainer.eval_batch_sharding), start=start,
                   start_batch=start_batch, saved_step=latest, meta=meta, flops=(fpt, peak))
    except BaseException:
        ckpt.close()
        raise


def resume_point(ckpt: Checkpointer, c, cfg: PhiConfig, compute: Compute,
                 data: TrainingData) -> tuple[int | None, dict, int]:
    """(newest checkpoint step or None, its metadata, the global batches consumed before it), after checking that
    the checkpoint holds this architecture and that the run's data and settings may continue it."""
    latest = ckpt.latest_step()
    if latest is None:
        return None, {}, 0
    saved_meta = ckpt.check_architecture(latest, cfg, compute)
    position = ckpt.data_position(latest, saved_meta)
    restart.check_restart(saved_meta, c, data.identity(), str(ckpt.directory / str(latest)))  # the same data
    return latest, saved_meta, position // c.batch_size  # exact: check_restart keeps the global batch size


def check_one_batch(dataset, c, data: TrainingData) -> None:
    """The train split must hold at least one global batch (read from a fresh iterator)."""
    if next(iter(dataset), None) is None:
        raise ValueError(f"The train split of {data.path} holds less than one global batch (batch_size={c.batch_size}"
                         f" x seq_len={c.seq_len} tokens): lower --config.batch_size or --config.seq_len, or add data.")


def summary(run: Run, last: dict[str, float]) -> str:
    """The run's last line: where it ended, its newest checkpoint, and the commands that use it."""
    step = run.saved_step
    losses = ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "val_loss") if k in last)
    workdir = shlex.quote(str(run.workdir))
    out = shlex.quote(f"exported/{run.workdir.name or 'run'}")
    return "\n".join([
        f"finished at step {step} of {run.c.total_steps}" + (f": {losses}" if losses else ""),
        f"  newest checkpoint: {run.ckpt.directory / str(step)}",
        f"  export to Hugging Face: python -m tools.export_hf --model={workdir} --out={out}",
        f"  generate: python -m phi_jax.generate --model={workdir} --prompt='def fibonacci(n):'"])


def _one_line(e: BaseException) -> str:
    """ml_collections' messages hold quoted newlines ("'x'\\nDid you mean ..."): one readable line."""
    return " ".join(str(e).replace("\\n", " ").replace("\\", "").replace("'", "").split())


def unknown_config_key(argv: list[str]) -> str | None:
    """The first --config.KEY override of `argv` that the run config does not have, worded with the keys it does
    have (the nearest, or those of the section named); None if every key exists. Keys are those of
    phi_jax/run_config.py's base_config, which every configs/*.py shares."""
    import difflib

    from phi_jax.run_config import base_config
    from phi_jax.validate import flatten

    keys = sorted(flatten(base_config()))
    sections = sorted({k.split(".")[0] for k in keys if "." in k})
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        if key in keys:
            continue
        if not key:
            return f"{arg!r} names no key: write --config.KEY=VALUE, e.g. --config.batch_size=8."
        section = key.split(".")[0]
        if section in sections:
            if key == section:
                return (f"--config.{key} is a section, not a value: set one of its keys, "
                        f"{', '.join(f'--config.{k}' for k in keys if k.startswith(section + '.'))}.")
            inside = [k for k in keys if k.startswith(section + ".")]
            near = difflib.get_close_matches(key, inside, n=1, cutoff=0.6)
            return (f"--config.{key} is not a run-config key" + (f"; did you mean --config.{near[0]}?" if near else
                    "") + f" The keys of {section}: {', '.join(k.split('.', 1)[1] for k in inside)}.")
        near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join('--config.' + k for k in near)}?" if near else
                "run python -m phi_jax.train --helpfull for the keys.")
        return (f"--config.{key} is not a run-config key; {hint} Top-level keys: "
                f"{', '.join(k for k in keys if '.' not in k)}; sections: {', '.join(sections)}.")
    return None


def define_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS):
    """--config and --workdir in `flag_values`: (config holder, workdir holder). ml_collections reads the
    --config.KEY overrides of `argv` while defining --config, so an unknown key is reported here, in one line
    naming it and the keys that exist."""
    if _config_is_base(argv) and (unknown := unknown_config_key(argv)) is not None:
        sys.exit(f"error: {unknown}")
    try:
        config = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "A configs/*.py run config.",
                                                 flag_values=flag_values, lock_config=True, sys_argv=argv)
    except (AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:
        sys.exit(f"error: unknown or invalid --config key: {_one_line(e)}")
    workdir = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go (default runs/<model>).",
                                  flag_values=flag_values)
    return config, workdir


def parse_command_line(argv: list[str], flag_values: flags.FlagValues | None = None):
    """(run config, workdir) of a `python -m phi_jax.train` command line, every value checked (validate.py); a bad
    one exits with status 1 and one line. (A fresh FlagValues parses in-process, as the tests do.)"""
    if flag_values is None:
        flag_values = flags.FLAGS
        app.define_help_flags()  # --help
    config, workdir = define_flags(argv, flag_values)
    if len(rest := parse_flags(argv, flag_values, config)) > 1:
        sys.exit(f"error: unexpected arguments {rest[1:]}; settings go in --config.KEY=VALUE.")
    c = config.value
    try:
        validate.check_values(c)  # every key's type and range, before anything is read, built or compiled
    except ValueError as e:
        sys.exit(f"error: {e}")
    return c, workdir.value if workdir.value is not None else f"runs/{c.model}"


def _config_is_base(argv: list[str]) -> bool:
    """Whether --config is one of this repository's configs/*.py (the default is), which all have base_config's
    keys; a config file of one's own may have others."""
    named = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return not named or Path(named[-1]).resolve().parent == Path(__file__).resolve().parents[1] / "configs"


def failed_write(e: OSError) -> str:
    """A failed write (disk full, permissions, ...) in training's words: checkpoints are atomic."""
    if isinstance(e, CheckpointWriteError | CacheDirError):
        return str(e)  # it names the newest complete checkpoint, or the cache directory and the way out
    return (f"Writing failed: {e}. The newest complete checkpoint is intact; free space or fix permissions and run "
            "the same command again to resume.")


def main() -> None:
    c, workdir = parse_command_line(sys.argv)
    check_workdir(workdir)
    distributed.maybe_initialize()
    train(c, workdir)


def check_workdir(workdir: str) -> None:
    """A workdir that cannot be one, said before anything is read or built: an empty path, a file, a symlink to
    nothing."""
    if not workdir.strip():
        raise ValueError("--workdir is empty: name the run's directory (default runs/<model>).")
    if is_url(workdir):
        return
    path = Path(workdir).expanduser()
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"--workdir={workdir} is a symbolic link to {os.readlink(path)}, which does not "
                                "exist: create that directory, or remove the link.")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--workdir={workdir} exists and is a file, not a directory: choose another "
                                 "--workdir.")


def parse_flags(argv: list[str], flag_values: flags.FlagValues, config) -> list[str]:
    """absl's parsing, with a bad --config (a wrong type, a missing file, a bad value) reported in one line."""
    try:
        rest = flag_values(argv)
        config.value.keys()  # the file loads lazily: load it now, so that its errors are reported here
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError,
            OverflowError) as e:
        sys.exit(f"error: {_one_line(e)}")
    return rest


if __name__ == "__main__":
    cli.run(main, failed_write=failed_write)
