"""Hugging Face paths on gs:// against a real GCS JSON API server (gcp-storage-emulator) on 127.0.0.1: an export to
the bucket (with a tokenizer read from the bucket), generate / evaluate / init_from_hf reading it back, and a failed
upload that leaves nothing a reader would take for a model."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from gcs_emulator import BUCKET, gcs_emulator
from runs import make_shards

IDS = np.random.default_rng(0).integers(0, 512, (2, 24))
TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n"


def _fresh_gcs_clients() -> None:
    """gcsfs and etils.epath keep one filesystem object per process: drop it, so that this module's emulator (a new
    port) is the one used, whatever ran before in the same process."""
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(scope="module")
def gcs():
    """The emulator (tests/gcs_emulator.py), its environment also set in this process (for etils.epath)."""
    with gcs_emulator() as env, pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        _fresh_gcs_clients()
        yield env
    _fresh_gcs_clients()


def _names(url: str) -> list[str]:
    from etils import epath

    _fresh_gcs_clients()  # no cached listing: what the bucket really holds
    path = epath.Path(url)
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def workdir(gcs, shards, tmp_path_factory):
    """A local workdir checkpoint of the tiny model whose recorded tokenizer lies in the bucket."""
    from etils import epath

    from phi_jax.checkpoint import Checkpointer
    from phi_jax.config import Compute, PhiConfig
    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import make_mesh
    from phi_jax.trainer import build_trainer

    tokenizer = f"gs://{BUCKET}/tokenizers/sp512.model"
    epath.Path(tokenizer).write_bytes((shards.parent / "sp512.model").read_bytes())
    wd = tmp_path_factory.mktemp("run")
    cfg = PhiConfig.preset("tiny")
    state = build_trainer(cfg, Compute(), make_optimizer(1e-3), make_mesh(devices=jax.devices()[:1])).init_state(3)
    ckpt = Checkpointer(wd, async_save=False)
    ckpt.save(1, state, {"model": cfg.to_dict(), "run": {"param_dtype": "float32", "seq_len": 32},
                         "data": {"tokenizer_path": tokenizer}})
    ckpt.close()
    return wd


@pytest.fixture(scope="module")
def exported(workdir):
    from phi_jax.hf.convert import export_hf

    return str(export_hf(workdir, f"gs://{BUCKET}/exported"))


def test_an_export_to_the_bucket_loads_back_with_its_tokenizer(workdir, exported, shards):
    import phi_jax
    from phi_jax.data.tokenizer import load_tokenizer
    from phi_jax.hf.io import MANIFEST
    from phi_jax.loading import tokenizer_file

    assert exported == f"gs://{BUCKET}/exported"
    assert _names(exported) == sorted(["config.json", "generation_config.json", "model.safetensors", MANIFEST,
                                       "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    ref = np.asarray(phi_jax.from_pretrained(workdir)(IDS)[0])
    np.testing.assert_array_equal(np.asarray(phi_jax.from_pretrained(exported)(IDS)[0]), ref)
    found = tokenizer_file(exported)
    assert os.fspath(found) == f"{exported}/tokenizer.json"
    sp = load_tokenizer(shards.parent / "sp512.model")  # the tokenizer.json converted from the bucket's .model
    assert load_tokenizer(found).encode(TEXT) == sp.encode(TEXT)


def test_generate_and_evaluate_read_a_bucket_directory(workdir, exported, tmp_path, capsys):
    from phi_jax import evaluate, generate
    from phi_jax.hf.convert import export_hf

    outputs = []
    local = export_hf(workdir, tmp_path / "local")  # the same export on disk (the same tokenizer.json)
    for model in (str(local), exported):
        generate.main(["--model", model, "--prompt", "def f(x):", "--max_new_tokens", "6"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("def f(x):")
    (tmp_path / "t.txt").write_text(TEXT * 4)
    evaluate.main(["--model", exported, "--text_file", str(tmp_path / "t.txt"), "--batch_size", "2"])
    out = capsys.readouterr().out
    assert f"{exported} on {tmp_path / 't.txt'}: " in out and "perplexity " in out


def test_init_from_hf_reads_a_bucket_directory(workdir, exported):
    """train's init_from_hf (Trainer.init_state, without compiling a train step) takes the bucket model's
    parameters."""
    from flax import nnx

    from phi_jax import from_pretrained
    from phi_jax.config import Compute, PhiConfig
    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import make_mesh
    from phi_jax.trainer import build_trainer

    ref = jax.tree.leaves(nnx.state(from_pretrained(workdir), nnx.Param))
    trainer = build_trainer(PhiConfig.preset("tiny"), Compute(), make_optimizer(1e-3),
                            make_mesh(devices=jax.devices()[:1]))
    state = trainer.init_state(9, init_from=exported)
    for a, b in zip(jax.tree.leaves(state.params), ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_failed_upload_leaves_nothing_a_reader_takes_for_a_model(workdir, monkeypatch):
    """The tokenizer's upload fails (after the weights'): a new directory is removed again; a replaced export is
    left without config.json, which nothing loads, and a retry with overwrite replaces it."""
    from etils import epath

    from phi_jax import from_pretrained
    from phi_jax.hf.convert import export_hf

    gpath = type(epath.Path(f"gs://{BUCKET}/x"))
    open_ = gpath.open

    def failing(self, mode="r", *args, **kwargs):
        if self.name == "tokenizer.json" and "w" in mode:
            raise OSError("injected: the bucket refused the object")
        return open_(self, mode, *args, **kwargs)

    fresh, replaced = f"gs://{BUCKET}/failed", f"gs://{BUCKET}/replaced"
    export_hf(workdir, replaced)
    monkeypatch.setattr(gpath, "open", failing)
    with pytest.raises(OSError, match=r"Uploading .*failed \(OSError: injected: .*\); nothing was left in the bucket"):
        export_hf(workdir, fresh)
    assert _names(fresh) == []
    with pytest.raises(OSError, match=r"partly replaced and has no config.json now.*rerun with overwrite"):
        export_hf(workdir, replaced, overwrite=True)
    assert "config.json" not in _names(replaced) and "model.safetensors" in _names(replaced)
    with pytest.raises(FileNotFoundError, match=r"No config\.json"):
        from_pretrained(replaced)
    monkeypatch.undo()
    _fresh_gcs_clients()
    export_hf(workdir, replaced, overwrite=True)  # the retry: everything there is owned by an export
    np.testing.assert_array_equal(np.asarray(from_pretrained(replaced)(IDS)[0]),
                                  np.asarray(from_pretrained(workdir)(IDS)[0]))
