"""phi_jax.loading: one place that tells a workdir, a Hugging Face directory and a Hub id apart, and loads any."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import phi_jax
from phi_jax import loading
from phi_jax.checkpoint import Checkpointer
from phi_jax.config import Compute, PhiConfig
from phi_jax.model import init_model

ROOT = Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(0).integers(0, 512, (2, 24))


@pytest.fixture(scope="module")
def model():
    return init_model(PhiConfig.preset("tiny"), seed=5)


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
    out = phi_jax.save_pretrained(model, tmp_path_factory.mktemp("hf") / "tiny")
    (out / "tokenizer.json").write_text("{}")  # only found here, never parsed
    return out


@pytest.fixture(scope="module")
def workdir(model, tmp_path_factory):
    from flax import nnx

    wd = tmp_path_factory.mktemp("run")
    ckpt = Checkpointer(wd, async_save=False)
    state = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}  # the train state's "params" subtree
    ckpt.save(7, state, {"model": model.cfg.to_dict(), "run": {"param_dtype": "float32", "seq_len": 16},
                         "data": {"tokenizer_path": str(wd / "sp.model")}})
    ckpt.close()
    (wd / "sp.model").write_bytes(b"stand-in")
    return wd


def test_resolve_tells_the_sources_apart_and_lists_them_when_it_cannot(hf_dir, workdir, tmp_path):
    assert loading.resolve(workdir).kind == loading.WORKDIR
    assert loading.resolve(str(hf_dir)).kind == loading.HF_DIRECTORY
    assert loading.tokenizer_file(workdir) == workdir / "sp.model"
    assert loading.tokenizer_file(hf_dir) == hf_dir / "tokenizer.json"
    (tmp_path / "other").mkdir()
    forms = ("a training workdir (it holds checkpoints/), a Hugging Face phi directory (config.json and "
             "model.safetensors; local or gs://), or a Hugging Face Hub id such as microsoft/phi-1_5")
    for bad in (tmp_path / "missing", tmp_path / "other", hf_dir / "config.json", "not-a-hub-id"):
        with pytest.raises(FileNotFoundError) as e:
            loading.resolve(bad)
        assert str(e.value).endswith(f"pass {forms}."), e.value
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    assert loading.tokenizer_file(tmp_path / "bare", required=False) is None
    with pytest.raises(FileNotFoundError, match=r"No tokenizer.json or tokenizer.model in .*bare; pass --tokenizer"):
        loading.tokenizer_file(tmp_path / "bare")


def test_from_pretrained_loads_a_workdir_and_a_directory_alike(model, hf_dir, workdir):
    ref = np.asarray(model(IDS)[0])
    for source in (workdir, hf_dir):
        np.testing.assert_array_equal(np.asarray(phi_jax.from_pretrained(source)(IDS)[0]), ref)
    bf16 = phi_jax.from_pretrained(hf_dir, Compute(dtype="bfloat16", param_dtype="bfloat16"))
    assert bf16.embed_tokens.dtype == jax.numpy.bfloat16 and bf16.compute.dtype == jax.numpy.bfloat16
    assert loading.load_config(workdir) == loading.load_config(hf_dir) == model.cfg
    with pytest.raises(ValueError, match="step=3 chooses a training workdir's checkpoint"):
        phi_jax.from_pretrained(hf_dir, step=3)


def _hub_cache(model_dir: Path, cache: Path, repo_id: str) -> None:
    """The layout huggingface_hub writes: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main = commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_id_loads_from_the_hub_cache_offline(model, hf_dir, tmp_path):
    """A Hub id goes through huggingface_hub's snapshot_download: with HF_HUB_OFFLINE=1 it reads the cache the test
    built, and an id the cache lacks is an error naming the accepted forms (no network is tried)."""
    _hub_cache(hf_dir, tmp_path / "hub", "phi-test/tiny-phi")
    np.save(tmp_path / "ids.npy", IDS)
    script = ("import sys, numpy as np, phi_jax\n"
              "ids = np.load(sys.argv[1])\n"
              "np.save(sys.argv[2], np.asarray(phi_jax.from_pretrained('phi-test/tiny-phi')(ids)[0]))\n"
              "print('tokenizer:', phi_jax.loading.tokenizer_file('phi-test/tiny-phi').name)\n"
              "try:\n    phi_jax.from_pretrained('phi-test/missing')\n"
              "except FileNotFoundError as e:\n    print('error:', e)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script, tmp_path / "ids.npy", tmp_path / "logits.npy"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), np.asarray(model(IDS)[0]), rtol=1e-6, atol=1e-6)
    assert "tokenizer: tokenizer.json" in result.stdout
    error = result.stdout.split("error: ", 1)[1]
    assert error.startswith("phi-test/missing is not a local path, and the Hugging Face Hub did not provide it")
    assert "or a Hugging Face Hub id such as microsoft/phi-1_5" in error


def test_init_from_hf_compares_the_whole_architecture_before_reading_weights(hf_dir, monkeypatch):
    """Every architecture field is compared (`==`), rope_theta included, before any weight is read."""
    import jax

    from phi_jax.config import Compute
    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import make_mesh
    from phi_jax.trainer import build_trainer

    monkeypatch.setattr(loading, "from_pretrained", lambda *a, **k: pytest.fail("weights read before the check"))
    trainer = build_trainer(PhiConfig.preset("tiny", rope_theta=500.0), Compute(), make_optimizer(1e-3),
                            make_mesh(devices=jax.devices()[:1]))
    with pytest.raises(ValueError, match=r"does not have the architecture of the run's model \(checkpoint vs run: "
                                         r"rope_theta: 10000.0 vs 500.0\); choose the preset"):
        trainer.pretrained_params(str(hf_dir))
