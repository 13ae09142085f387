"""Readers never write: generate, export, evaluate and `from_pretrained(workdir)` open a workdir read-only, so they
cannot remove a running trainer's in-progress (temporary) checkpoint."""

import jax

from phi_jax.checkpoint import Checkpointer, load_model, read_meta
from phi_jax.config import Compute, PhiConfig
from phi_jax.loading import from_pretrained, tokenizer_file
from phi_jax.optim import make_optimizer
from phi_jax.sharding import make_mesh
from phi_jax.trainer import build_trainer


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def test_readers_leave_an_in_progress_checkpoint_alone(tmp_path):
    cfg = PhiConfig.preset("tiny", max_position_embeddings=64)
    (tmp_path / "tokenizer.model").write_bytes(b"stand-in: only its existence is checked here")
    ckpt = Checkpointer(tmp_path, async_save=False)
    meta = {"model": cfg.to_dict(), "run": {"model": "tiny"},
            "data": {"tokenizer_path": str(tmp_path / "tokenizer.model")}}
    state = build_trainer(cfg, Compute(), make_optimizer(1e-3), make_mesh(devices=jax.devices()[:1])).init_state(0)
    ckpt.save(3, state.replace(step=state.step + 3), meta)
    ckpt.close()
    # What a trainer writing step 6 leaves on disk mid-write: orbax's temporary directory, renamed when complete.
    partial = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1764400000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half-written").write_bytes(b"x" * 100)
    before = _listing(tmp_path)

    assert load_model(tmp_path)[2] == 3
    from_pretrained(tmp_path)  # generate, export, evaluate, lm_eval_adapter and the library
    assert tokenizer_file(tmp_path) == tmp_path / "tokenizer.model"
    assert read_meta(tmp_path)["model"] == cfg.to_dict()
    assert _listing(tmp_path) == before  # nothing created, removed or changed

    writer = Checkpointer(tmp_path, async_save=False)  # the trainer, by contrast, removes a crashed write's
    writer.save(4, state.replace(step=state.step + 4), meta)  # temporary directory before its first save
    writer.close()
    assert not partial.exists()
