"""Train phi: `python -m phi_jax.train --config=configs/phi15.py --workdir=DIR [--config.KEY=VALUE ...]`.

Restarting the same command with the same workdir resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from phi_jax import distributed, host_memory, memory_check, restart, validate
from phi_jax.checkpoint import Checkpointer, CheckpointWriteError
from phi_jax.config import PhiConfig
from phi_jax.data.training_data import resolve_data
from phi_jax.flops import flops_per_token, peak_flops_per_device
from phi_jax.metrics import MetricsWriter
from phi_jax.optim import LossScale, make_optimizer
from phi_jax.paths import user_path
from phi_jax.preemption import PREEMPTED_EXIT_CODE, Preemption
from phi_jax.sharding import batch_sharding, make_mesh, strategy_rules
from phi_jax.train_state import TrainState, create_train_state, state_shardings
from phi_jax.train_step import jit_steps
from phi_jax.workdir_lock import WorkdirLock

log = logging.getLogger("phi_jax")


class NonFiniteError(RuntimeError):
    pass


def model_config(c: ml_collections.ConfigDict, vocab_size: int) -> PhiConfig:
    """The architecture for this run; the tokenizer's ids must fit the embedding."""
    cfg = PhiConfig.preset(c.model, dtype=c.dtype, param_dtype=c.param_dtype, attention_impl=c.attention_impl,
                           dense_impl=c.dense_impl, remat=c.remat)
    if vocab_size > cfg.vocab_size:
        raise ValueError(f"The tokenizer has {vocab_size} ids but model {c.model!r} embeds {cfg.vocab_size}: "
                         "use a model with a larger vocab_size or a smaller tokenizer.")
    if c.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len={c.seq_len} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}; lower --config.seq_len.")
    return cfg


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


def train(c: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Runs (or resumes) training; returns the last logged metrics. A SIGTERM/SIGINT exits with status 75."""
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None  # one trainer per workdir
    preemption = Preemption(before_immediate_exit=lock.release if lock is not None else None)
    try:
        return _train(c, user_path(workdir), preemption, lock)
    finally:
        if lock is not None:
            lock.release()
        preemption.close()


def _train(c: ml_collections.ConfigDict, workdir, preemption: Preemption,
           lock: WorkdirLock | None) -> dict[str, float]:
    validate.check_values(c)  # every key's type and range, before anything is read, built or compiled
    mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, dcn_data=c.mesh.dcn_data)
    accum = accumulation_steps(c, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    if lock is not None:
        lock.acquire()
    data = resolve_data(c)  # builds the embedded corpus on first use; checks shards against the tokenizer
    cfg = model_config(c, data.tokenizer.vocab_size)
    data.check_model_vocab(cfg.vocab_size)
    param_rules, opt_rules = strategy_rules(c.sharding)
    tx = make_optimizer(c.learning_rate, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                        warmup_steps=c.warmup_steps, grad_clip_norm=c.grad_clip_norm)
    fp16 = c.dtype == "float16"
    log.info("model %s: %.1fM parameters; mesh %s; sharding %s; %d micro-batch(es) per step",
             c.model, cfg.num_params() / 1e6, dict(mesh.shape), c.sharding, accum)

    ckpt = Checkpointer(workdir, max_to_keep=c.keep_checkpoints)
    abstract, shardings = state_shardings(cfg, tx, mesh, param_rules, opt_rules, fp16)
    meta = {"model": cfg.to_dict(), "run": c.to_dict(), "data": data.identity()}

    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    latest = ckpt.latest_step()
    start_batch = 0  # the data position: global batches consumed, whatever the process count that consumed them
    if latest is not None:
        saved_meta = ckpt.check_architecture(latest, cfg)
        if (position := ckpt.data_position(latest, saved_meta)) is not None:  # the data must be the same
            restart.check_restart(saved_meta, c, data.identity(), str(ckpt.directory / str(latest)))
            start_batch = position // c.batch_size  # exact: check_restart keeps the global batch size
        else:
            log.info("checkpoint %d holds no data-iterator state (position); the data starts from the beginning",
                     latest)
    dataset = data.train_dataset(c, jax.process_index(), jax.process_count(), start_batch)
    data_iter = iter(dataset)

    train_batch_sh, eval_batch_sh = batch_sharding(mesh, leading_dims=1), batch_sharding(mesh)
    step_fn, eval_fn = jit_steps(mesh, shardings, param_rules)
    memory_check.check_state_fits(target, target.params)  # before compiling or allocating anything
    first = next(iter(dataset), None)  # the batch's keys, shapes and dtypes (a fresh iterator: data_iter stays put)
    if first is None:
        raise ValueError(f"The train split of {data.path} holds less than one global batch (batch_size={c.batch_size}"
                         f" x seq_len={c.seq_len} tokens): lower --config.batch_size or --config.seq_len, or add data.")
    abstract_batch = {k: jax.ShapeDtypeStruct((accum, c.batch_size // accum, *v.shape[1:]), v.dtype,
                                              sharding=train_batch_sh) for k, v in first.items()}
    log.info("compiling the train step")
    compiled_step = step_fn.lower(target, abstract_batch).compile()
    memory_check.check_compiled_fits(compiled_step)  # still before allocating the state

    if latest is not None:
        state = ckpt.restore(latest, target)
        if restart.loss_scale_reset(saved_meta, c):
            log.warning("dtype changed from %s to %s: the loss scale starts afresh", saved_meta["run"]["dtype"],
                        c.dtype)
            state = state.replace(loss_scale=jax.device_put(LossScale.create(dynamic=fp16), shardings.loss_scale))
        log.info("resumed from %s at step %d", ckpt.directory, latest)
    else:
        state = create_train_state(cfg, tx, mesh, seed=c.seed, fp16_loss_scale=fp16, rules=param_rules,
                                   opt_rules=opt_rules)
        if c.init_from_hf:
            state = _load_hf_params(state, c, cfg, shardings)

    eval_batches = {}  # per source ("" for a single directory)
    if c.eval_every > 0 and c.eval_batches > 0:
        eval_batches = data.eval_batches(c.seq_len, c.batch_size // accum, c.eval_batches)

    def evaluate(state: TrainState) -> dict[str, float]:
        per_process = c.batch_size // accum // jax.process_count()
        losses = {}
        for name, batches in eval_batches.items():
            total = tokens = 0.0
            for b in batches:
                local = {k: v[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
                         for k, v in b.items()}
                sh = {k: jax.make_array_from_process_local_data(eval_batch_sh, v, b[k].shape)
                      for k, v in local.items()}
                t, n = eval_fn(state, sh)
                total, tokens = total + float(t), tokens + float(n)
            losses[name] = total / max(tokens, 1.0)
        return data.val_metrics(losses)  # val_loss, and val_loss/<source> for a mixture

    def save(state: TrainState, step: int) -> None:
        if not bool(all_finite(state.params)):
            raise NonFiniteError(f"Parameters are not finite at step {step}; not checkpointing over the last good "
                                 "state. Lower the learning rate or enable --config.grad_clip_norm.")
        ckpt.save(step, state, {**meta, "data_position": (step - start + start_batch) * c.batch_size})

    start = int(state.step)
    if start >= c.total_steps:
        log.info("the run is complete at step %d (total_steps=%d); raise --config.total_steps to train further",
                 start, c.total_steps)
    tokens_per_step = c.batch_size * c.seq_len
    fpt = flops_per_token(cfg, c.seq_len)
    peak, peak_source = peak_flops_per_device(c.peak_flops_per_device)
    log.info("%.3g FLOPs/token (causal attention counted); peak %.3g FLOP/s per device (%s)", fpt, peak,
             peak_source)
    writer = MetricsWriter(workdir, c.total_steps, start)
    saved_step = start if latest is not None else None  # the step the newest durable checkpoint holds
    last: dict[str, float] = {}
    if start == 0 and eval_batches:
        last = evaluate(state)
        writer.write(0, last)
    tick, tick_step = time.perf_counter(), start
    try:
        for step in range(start + 1, c.total_steps + 1):
            if preemption.agreed():
                if saved_step != step - 1:  # a signal on a checkpoint step: that step is already being saved
                    save(state, step - 1)
                ckpt.close()  # waits for the asynchronous write: the checkpoint is durable
                log.warning("preempted: checkpoint of step %d is durable; exiting with %d", step - 1,
                            PREEMPTED_EXIT_CODE)
                sys.exit(PREEMPTED_EXIT_CODE)
            batch = global_batch(next(data_iter), accum, train_batch_sh)
            state, metrics = compiled_step(state, batch)
            if step == start + 1:
                jax.block_until_ready(metrics)
                preemption.trained()  # from now on a signal checkpoints at the next step boundary
            writer.advance()
            if step % c.log_every == 0 or step == c.total_steps or step == start + 1:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                step_time = (now - tick) / max(step - tick_step, 1)
                tick, tick_step = now, step
                tokens_per_sec = tokens_per_step / step_time
                metrics.update(step_time=step_time, tokens_per_sec=tokens_per_sec,
                               mfu=tokens_per_sec * fpt / (peak * jax.device_count()),
                               eta_sec=step_time * (c.total_steps - step), total_skipped=float(state.total_skipped))
                metrics.update(data.tokens_seen(step * c.batch_size, c.seq_len))  # tokens/<source> of a mixture
                if metrics["skipped"]:
                    log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step,
                                int(metrics["consecutive_skips"]))
                last = metrics
                writer.write(step, metrics)
            if int(state.skipped) >= c.max_consecutive_skips:
                raise NonFiniteError(f"{int(state.skipped)} consecutive updates had a non-finite loss or gradient "
                                     f"(step {step}); stopping. Lower the learning rate, enable grad clipping, or "
                                     "check the data. The last checkpoint holds the last good state.")
            if eval_batches and (step % c.eval_every == 0 or step == c.total_steps):
                val = evaluate(state)
                last = {**last, **val}
                writer.write(step, val)
            if step % c.checkpoint_every == 0 or step == c.total_steps:
                save(state, step)
                saved_step = step
    finally:
        writer.close()
        ckpt.close()
    return last


def _load_hf_params(state: TrainState, c, cfg: PhiConfig, shardings: TrainState) -> TrainState:
    """Replaces freshly initialised parameters with a Hugging Face checkpoint's (fine-tuning)."""
    from flax import nnx

    from phi_jax.hf import from_pretrained

    hf = from_pretrained(c.init_from_hf, dtype=c.dtype, param_dtype=c.param_dtype)
    if (d := {k: (getattr(hf.cfg, k), getattr(cfg, k)) for k in ("vocab_size", "hidden_size", "num_layers")
              if getattr(hf.cfg, k) != getattr(cfg, k)}):
        raise ValueError(f"{c.init_from_hf} does not match model {c.model!r}: {d} (checkpoint, run).")
    params = jax.device_put(nnx.to_pure_dict(nnx.state(hf, nnx.Param)), shardings.params)
    log.info("initialised parameters from %s", c.init_from_hf)
    return state.replace(params=params)


def _one_line(e: BaseException) -> str:
    """ml_collections' messages hold quoted newlines ("'x'\\nDid you mean ..."): one readable line."""
    return " ".join(str(e).replace("\\n", " ").replace("\\", "").replace("'", "").split())


def define_flags() -> None:
    """--config and --workdir. ml_collections reads the --config.KEY overrides while defining --config, so a
    misspelt key is reported here, in one line with its "did you mean" hint."""
    global _CONFIG, _WORKDIR
    try:
        _CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "A configs/*.py run config.",
                                                  lock_config=True)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        sys.exit(f"error: unknown or invalid --config key: {_one_line(e)}")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go (default runs/<model>).")


def _without_orbax_tracebacks(record: logging.LogRecord) -> bool:
    """orbax logs a failed background write with a traceback from each of its threads; phi_jax reports the error
    itself (CheckpointWriteError), so orbax's records keep only their first line."""
    if "orbax" in record.pathname and record.exc_info:
        record.exc_info, record.exc_text = None, None
    return True


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; settings go in --config.KEY=VALUE.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(_without_orbax_tracebacks)
    log.info("host memory: %s", host_memory.status())
    distributed.maybe_initialize()
    c = _CONFIG.value
    workdir = _WORKDIR.value or f"runs/{c.model}"
    try:
        train(c, workdir)
    except CheckpointWriteError as e:
        log.error("%s", e)
        sys.exit(1)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteError) as e:
        log.error("%s", e)
        sys.exit(1)
    except OSError as e:  # disk full, permission denied, ...: checkpoints are atomic, so the previous one is intact
        log.error("Writing to %s failed: %s. The newest complete checkpoint is intact; free space or fix "
                  "permissions and run the same command again to resume.", workdir, e)
        sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad --config (a misspelt key, a wrong type, a missing file) reported in one line."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # the file loads lazily: load it now, so that its errors are reported here
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        sys.exit(f"error: {_one_line(e)}")
    return rest


if __name__ == "__main__":
    host_memory.ensure_huge_pages()  # a CPU host restarts once with malloc on huge pages; see host_memory.py
    define_flags()
    app.run(main, flags_parser=parse_flags)
