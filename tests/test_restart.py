"""Checked restarts: a resumed run keeps its data identity (phi_jax/restart.py); safe changes pass."""

from __future__ import annotations

import numpy as np
import pytest
from runs import make_shards, metrics, tiny_config

from phi_jax import restart
from phi_jax.checkpoint import Checkpointer
from phi_jax.config import Compute, PhiConfig
from phi_jax.run_config import base_config
from phi_jax.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


def config(shards, **overrides):
    return tiny_config(shards, **{"eval_every": 0, "log_every": 1, "checkpoint_every": 2, **overrides})


def test_corrupting_changes_are_refused_safe_ones_pass_and_fp16_gets_a_fresh_loss_scale(tmp_path, shards):
    train(config(shards), tmp_path)  # float32, 2 steps, checkpoint 2 with its data position
    with pytest.raises(ValueError, match=r"batch_size: 8 -> 16; data.packing: False -> True; seed: 0 -> 1; "
                                         r"seq_len: 32 -> 16\. .*allow_changes=batch_size,data.packing,seed,seq_len"):
        train(config(shards, seq_len=16, batch_size=16, seed=1, **{"data.packing": True}), tmp_path)
    with pytest.raises(ValueError, match=r"allow_changes names \['sede'\], which a restart does not check"):
        train(config(shards, seed=1, allow_changes="sede"), tmp_path)
    with pytest.raises(ValueError, match=r"holds float32 parameters but the run has param_dtype=bfloat16; resuming "
                                         r"does not cast the train state\. Set --config.param_dtype=float32"):
        train(config(shards, param_dtype="bfloat16"), tmp_path)
    assert Checkpointer(tmp_path).all_steps() == [2]  # nothing was written by the refused restarts
    # The remedy the error names: a new workdir initialised from this one (its parameters cast on loading) trains.
    cast = train(config(shards, param_dtype="bfloat16", init_from_hf=str(tmp_path), total_steps=1), tmp_path / "bf16")
    assert np.isfinite(cast["loss"])

    # Allowed with --config.allow_changes, together with the safe changes: learning rate, total_steps, cadences,
    # mesh and micro-batch (2 micro-batches of 4 per step on a 4 x 2 mesh), and float16 compute.
    safe = dict(seed=1, allow_changes="seed", learning_rate=1e-4, total_steps=3, log_every=1, checkpoint_every=3,
                micro_batch_per_device=1, dtype="float16",
                **{"mesh.data": 4, "mesh.fsdp": 1, "mesh.tensor": 2, "data.verify_checksums": False})
    train(config(shards, **safe), tmp_path)
    step3 = [r for r in metrics(tmp_path) if r.get("step") == 3 and "loss" in r][-1]
    assert step3["loss_scale"] == 2.0**15  # fp16's initial dynamic scale, not the fp32 run's static 1


def test_the_identity_covers_every_data_key_including_later_ones():
    """Keys under c.data (the mixture's weights, and any added later) are part of the identity without listing
    them."""
    run = base_config().to_dict()
    run["data"]["mixture_weights"] = "0.5,0.5"
    saved = {"run": run, "data": {"path": "/shards", "tokenizer": {"sha256": "x"}}}
    c = base_config()
    c.data.mixture_weights = "0.7,0.3"
    with pytest.raises(ValueError, match=r"data.mixture_weights: .* -> .*allow_changes=data.mixture_weights"):
        restart.check_restart(saved, c, {"path": "/shards", "tokenizer": {"sha256": "x"}}, "here")
    with pytest.raises(ValueError, match=r"data.path: '/shards' -> '/other'; data.tokenizer: .*"):
        restart.check_restart(saved, base_config(), {"path": "/other", "tokenizer": {"sha256": "y"}}, "here")
    c.allow_changes = "data.mixture_weights"
    restart.check_restart(saved, c, {"path": "/shards", "tokenizer": {"sha256": "x"}}, "here")
    assert "data.cache_dir" not in restart.identity(run, {})  # where the corpus is built, not what it holds
    assert "data.verify_checksums" not in restart.identity(run, {})  # how the shards are checked, not what they are


def test_a_restart_checks_the_architecture_by_equality_and_the_parameter_dtype(tmp_path):
    """meta["model"] is the architecture (compared with ==; a key that is not an architecture field is refused);
    the saved parameters' dtype comes from the run config."""
    import jax

    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import make_mesh
    from phi_jax.trainer import build_trainer

    cfg = PhiConfig.preset("tiny")
    ckpt = Checkpointer(tmp_path, async_save=False)
    state = build_trainer(cfg, Compute(), make_optimizer(1e-3), make_mesh(devices=jax.devices()[:1])).init_state()
    ckpt.save(1, state, {"model": cfg.to_dict(), "run": {"param_dtype": "float32"}})
    ckpt.save(2, state, {"model": {**cfg.to_dict(), "param_dtype": "bfloat16"}, "run": {}})
    assert ckpt.check_architecture(1, cfg, Compute())["run"] == {"param_dtype": "float32"}
    with pytest.raises(ValueError, match="holds float32 parameters but the run has param_dtype=float16"):
        ckpt.check_architecture(1, cfg, Compute(param_dtype="float16"))
    with pytest.raises(ValueError, match=r"Unknown PhiConfig fields \['param_dtype'\]"):
        ckpt.check_architecture(2, cfg, Compute(param_dtype="bfloat16"))
    with pytest.raises(ValueError, match=r"different architecture \(checkpoint vs run: num_layers: 2 vs 3; "
                                         r"rope_theta: 10000.0 vs 500.0\)"):
        ckpt.check_architecture(1, cfg.replace(num_layers=3, rope_theta=500.0), Compute())
    ckpt.close()


def test_other_shards_under_the_same_path_are_refused_like_another_path(tmp_path, shards):
    """Train on D, replace D's shards by others (same path, same tokenizer), restart: refused, naming data.shards
    (the digest of the shard files' recorded sizes and checksums); accepted with allow_changes=data.shards. The
    same shards rewritten byte for byte (a copy) are the same data."""
    import shutil

    from runs import documents

    from phi_jax.checkpoint import read_meta
    from phi_jax.data.prepare import prepare_shards
    from phi_jax.data.tokenizer import load_tokenizer
    from phi_jax.data.training_data import resolve_data

    data = tmp_path / "D"
    shutil.copytree(shards, data)
    train(config(data), tmp_path / "run")
    copied = tmp_path / "copy"
    shutil.copytree(data, copied)
    shutil.rmtree(data)
    shutil.copytree(copied, data)  # the same bytes again: not a change
    restart.check_restart(read_meta(tmp_path / "run"), config(data), resolve_data(config(data)).identity(), "here")
    tok = load_tokenizer(next(shards.glob("*.model")))
    prepare_shards(documents(60)[20:], tok, data, val_fraction=0.1, docs_per_shard=20, workers=1, overwrite=True)
    with pytest.raises(ValueError, match=r"Resuming .* with changes that would reuse its saved data position for "
                                         r"other data: data.shards: '[0-9a-f]{64}' -> '[0-9a-f]{64}'\. .*"
                                         r"--config.allow_changes=data.shards"):
        train(config(data, total_steps=3), tmp_path / "run")
    assert Checkpointer(tmp_path / "run").all_steps() == [2]  # nothing written
    c = config(data, allow_changes="data.shards")
    restart.check_restart(read_meta(tmp_path / "run"), c, resolve_data(c).identity(), "here")
