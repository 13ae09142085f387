"""Train phi: `python -m phi_jax.train --config=configs/phi15.py --workdir=DIR [--config.KEY=VALUE ...]`.

Restarting the same command with the same workdir resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from phi_jax import distributed, host_memory
from phi_jax.checkpoint import Checkpointer
from phi_jax.config import PhiConfig
from phi_jax.data.setup import resolve_data
from phi_jax.flops import flops_per_token, peak_flops_per_device
from phi_jax.metrics import MetricsWriter
from phi_jax.optim import make_optimizer
from phi_jax.sharding import batch_sharding, make_mesh, strategy_rules
from phi_jax.train_state import TrainState, create_train_state, state_shardings
from phi_jax.train_step import jit_steps

log = logging.getLogger("phi_jax")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was written on SIGTERM/SIGINT; run the same command again


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
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if c.batch_size % shards:
        raise ValueError(f"batch_size={c.batch_size} is not divisible by the {shards} data-parallel devices "
                         "(mesh data x fsdp); choose a multiple.")
    if c.batch_size % jax.process_count():
        raise ValueError(f"batch_size={c.batch_size} is not divisible by the {jax.process_count()} processes.")
    if c.micro_batch_per_device <= 0:
        return 1
    micro = c.micro_batch_per_device * shards
    if c.batch_size % micro:
        raise ValueError(f"batch_size={c.batch_size} is not a multiple of micro_batch_per_device x data-parallel "
                         f"devices = {c.micro_batch_per_device} x {shards}; adjust either.")
    return c.batch_size // micro


def global_batch(local: dict[str, np.ndarray], accum: int, sharding) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, shaped [accum, micro_batch, seq]."""
    out = {}
    for key, x in local.items():
        x = x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
        shape = (accum, x.shape[1] * jax.process_count(), *x.shape[2:])
        out[key] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out


class Preemption:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        self.requested = True

    def agreed(self) -> bool:
        """True when any process was signalled (processes must stop at the same step)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())


@jax.jit
def all_finite(params) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def train(c: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Runs (or resumes) training; returns the last logged metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = resolve_data(c)  # builds the embedded corpus on first use; checks shards against the tokenizer
    cfg = model_config(c, data.tokenizer.vocab_size)
    data.check_model_vocab(cfg.vocab_size)
    mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, dcn_data=c.mesh.dcn_data)
    accum = accumulation_steps(c, mesh)
    param_rules, opt_rules = strategy_rules(c.sharding)
    tx = make_optimizer(c.learning_rate, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                        warmup_steps=c.warmup_steps, grad_clip_norm=c.grad_clip_norm)
    fp16 = c.dtype == "float16"
    log.info("model %s: %.1fM parameters; mesh %s; sharding %s; %d micro-batch(es) per step",
             c.model, cfg.num_params() / 1e6, dict(mesh.shape), c.sharding, accum)

    data_iter = iter(data.train_dataset(c, jax.process_index(), jax.process_count()))
    ckpt = Checkpointer(workdir, max_to_keep=c.keep_checkpoints)
    abstract, shardings = state_shardings(cfg, tx, mesh, param_rules, opt_rules, fp16)
    meta = {"model": cfg.to_dict(), "run": c.to_dict(), "data": data.identity()}

    latest = ckpt.latest_step()
    if latest is not None:
        ckpt.check_architecture(latest, cfg)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state = ckpt.restore(latest, target, data_iter)
        log.info("resumed from %s at step %d", ckpt.directory, latest)
    else:
        state = create_train_state(cfg, tx, mesh, seed=c.seed, fp16_loss_scale=fp16, rules=param_rules,
                                   opt_rules=opt_rules)
        if c.init_from_hf:
            state = _load_hf_params(state, c, cfg, shardings)

    train_batch_sh, eval_batch_sh = batch_sharding(mesh, leading_dims=1), batch_sharding(mesh)
    step_fn, eval_fn = jit_steps(mesh, shardings, param_rules)
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
        ckpt.save(step, state, data_iter, meta)

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
    preemption = Preemption()
    last: dict[str, float] = {}
    if start == 0 and eval_batches:
        last = evaluate(state)
        writer.write(0, last)
    tick, tick_step = time.perf_counter(), start
    try:
        for step in range(start + 1, c.total_steps + 1):
            if preemption.agreed():
                save(state, step - 1)
                ckpt.close()
                log.warning("preempted: checkpoint of step %d is durable; exiting with %d", step - 1,
                            PREEMPTED_EXIT_CODE)
                sys.exit(PREEMPTED_EXIT_CODE)
            batch = global_batch(next(data_iter), accum, train_batch_sh)
            state, metrics = step_fn(state, batch)
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


_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "A configs/*.py run config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go (default runs/<model>).")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; settings go in --config.KEY=VALUE.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    log.info("host memory: %s", host_memory.status())
    distributed.maybe_initialize()
    c = _CONFIG.value
    workdir = _WORKDIR.value or f"runs/{c.model}"
    try:
        train(c, workdir)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteError) as e:
        log.error("%s", e)
        sys.exit(1)
    except OSError as e:  # disk full, permission denied, ...: checkpoints are atomic, so the previous one is intact
        log.error("Writing to %s failed: %s. The newest complete checkpoint is intact; free space or fix "
                  "permissions and run the same command again to resume.", workdir, e)
        sys.exit(1)


if __name__ == "__main__":
    host_memory.ensure_huge_pages()  # a CPU host restarts once with malloc on huge pages; see host_memory.py
    app.run(main)
