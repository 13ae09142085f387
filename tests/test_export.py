"""export_hf (phi_jax.hf.convert; tools/export_hf.py is its command line) and starting from exported weights: a
workdir checkpoint -> transformers (weights and tokenizer) and back."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

from phi_jax.checkpoint import Checkpointer, load_model
from phi_jax.config import Compute, PhiConfig
from phi_jax.hf.convert import export_hf
from phi_jax.optim import make_optimizer
from phi_jax.sharding import make_mesh
from phi_jax.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(os.__file__).parent


def _source(names):
    return [(STDLIB / n).read_text(encoding="utf-8") for n in names]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """The tokenizer the project trains (phi_jax.data.tokenizer.train_sentencepiece, as tools/train_tokenizer.py and
    the embedded corpus use it), not a hand-configured one."""
    from phi_jax.data.tokenizer import train_sentencepiece

    return train_sentencepiece(_source(sorted(p.name for p in STDLIB.glob("*.py"))[:30]),
                               tmp_path_factory.mktemp("tok") / "sp", vocab_size=512)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, sp_model):
    cfg = PhiConfig.preset("tiny", max_position_embeddings=256)
    tx = make_optimizer(1e-3)
    mesh = make_mesh(devices=jax.devices()[:1])
    wd = tmp_path_factory.mktemp("run")
    ckpt = Checkpointer(wd, async_save=False)
    meta = {"model": cfg.to_dict(), "run": {"model": "tiny"}, "data": {"tokenizer_path": str(sp_model)}}
    for step, seed in ((10, 1), (20, 2)):
        state = build_trainer(cfg, Compute(), tx, mesh).init_state(seed)
        ckpt.save(step, state.replace(step=state.step + step), meta)
    ckpt.close()
    return wd


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    return export_hf(str(workdir), str(tmp_path_factory.mktemp("hf") / "model"), step=10)


def test_load_model_chooses_steps_and_reports_missing_ones(workdir, tmp_path):
    newest, _, step = load_model(workdir)
    assert step == 20
    older, _, _ = load_model(workdir, 10)
    assert not np.allclose(np.asarray(newest.embed_tokens[...]), np.asarray(older.embed_tokens[...]))
    with pytest.raises(ValueError, match=r"No checkpoint at step 15 .*available steps: \[10, 20\]"):
        load_model(workdir, 15)
    with pytest.raises(FileNotFoundError, match="no checkpoints/ directory"):
        load_model(tmp_path)
    from phi_jax import from_pretrained  # a workdir loads through the same entry point as a HF directory

    assert np.array_equal(np.asarray(from_pretrained(workdir).embed_tokens[...]), np.asarray(newest.embed_tokens[...]))


def test_transformers_loads_same_logits_and_greedy_text(workdir, exported, sp_model):
    import torch
    import transformers

    from phi_jax.generate import Sampler, generate, load

    ours, tok = load(workdir, step=10)
    ref = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    prompt = "def main(argv):\n    for name in sorted(argv):\n"
    ids = tok.encode(prompt)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(np.asarray([ids], np.int32))[0]), ref_logits, atol=1e-4, rtol=1e-4)
    ours_text = generate(Sampler(ours), tok, [prompt], max_new_tokens=12, stop_at_eos=False)[0]
    with torch.no_grad():
        out = ref.generate(torch.tensor([hf_tok.encode(prompt)]), max_new_tokens=12, min_new_tokens=12,
                           do_sample=False, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    assert tok.decode(new) == ours_text  # transformers generated the very tokens phi_jax did
    if "\ufffd" not in ours_text:  # invalid UTF-8 byte runs decode differently: see the xfail below
        assert hf_tok.decode(new) == ours_text


def test_export_is_what_serving_engines_load(exported):
    """The README's path to serving at scale (vLLM, also TGI and SGLang): those engines pick the model class from
    config.json's `architectures`, read the Phi fields from it (older versions the top-level rope_theta and
    partial_rotary_factor), and load the safetensors by transformers' parameter names. The export declares
    PhiForCausalLM and holds exactly transformers' keys and shapes, with its tokenizer beside them."""
    import json

    import torch
    import transformers
    from safetensors import safe_open

    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["PhiForCausalLM"] and cfg["model_type"] == "phi"
    assert cfg["tie_word_embeddings"] is False and cfg["qk_layernorm"] is False and cfg["hidden_act"] == "gelu_new"
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    assert cfg["partial_rotary_factor"] == cfg["rope_parameters"]["partial_rotary_factor"]
    with torch.device("meta"):
        reference = transformers.PhiForCausalLM(transformers.AutoConfig.from_pretrained(exported))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    found = {}
    for f in exported.glob("*.safetensors"):
        with safe_open(f, "np") as tensors:
            found.update({k: tuple(tensors.get_slice(k).get_shape()) for k in tensors.keys()})  # noqa: SIM118
    assert found == expected
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in exported.iterdir()}


@pytest.mark.xfail(strict=True, reason="tokenizers' ByteFallback decoder replaces a whole run of byte pieces with "
                   "U+FFFD when the run is not valid UTF-8; SentencePiece keeps its valid bytes (e.g. <0x47><0x90>"
                   "<0x47>: 'G\ufffdG' vs three U+FFFD). Only text a model generates can hold such runs.")
def test_invalid_byte_runs_decode_like_sentencepiece(exported, sp_model):
    import sentencepiece as spm
    import transformers

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    ids = [sp.piece_to_id(p) for p in ("<0x47>", "<0x90>", "<0x47>")]
    assert hf_tok.decode(ids) == sp.decode(ids)


def test_hf_tokenizer_encodes_like_sentencepiece(exported, sp_model):
    import sentencepiece as spm
    import transformers

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    held_out = sorted(p.name for p in STDLIB.glob("*.py"))[30:45]
    texts = [*_source(held_out), "\tindent\n\t\tdeeper  two  spaces\n\n", "unicode: héllo wörld ☃ 日本語 \u2028 ok\n"]
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert hf_tok.decode(sp.encode(text)) == text
    assert hf_tok.eos_token == "<|endoftext|>"
    assert hf_tok.eos_token_id == sp.piece_to_id("<|endoftext|>")


def test_export_refuses_existing_dir_and_bad_steps(workdir, exported, tmp_path):
    export = export_hf
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(str(workdir), str(exported))
    with pytest.raises(ValueError, match="available steps"):
        export(str(workdir), str(tmp_path / "out"), step=3)
    with pytest.raises(FileNotFoundError):
        export(str(tmp_path / "empty"), str(tmp_path / "out2"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_init_from_pretrained_takes_the_exported_weights(exported, workdir):
    """Trainer.init_state(init_from=...) (--config.init_from_hf) starts from a Hugging Face directory's or a
    workdir's parameters, in the run's param dtype, with a fresh optimizer state; another architecture is refused
    before any weight is read."""
    import jax.numpy as jnp
    from flax import nnx

    from phi_jax import from_pretrained

    cfg, mesh = PhiConfig.preset("tiny", max_position_embeddings=256), make_mesh(devices=jax.devices()[:1])
    for source, dtype in ((exported, "float32"), (workdir, "bfloat16")):
        trainer = build_trainer(cfg, Compute(param_dtype=dtype), make_optimizer(1e-3), mesh)
        state = trainer.init_state(9, init_from=str(source))
        direct = nnx.state(from_pretrained(source), nnx.Param)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(direct), strict=True):
            assert a.dtype == jnp.dtype(dtype)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b[...].astype(dtype)))
        mu = state.opt_state.inner_state[0].mu
        assert all(not np.asarray(m).any() for m in jax.tree.leaves(mu)) and int(state.step) == 0
    other = build_trainer(cfg.replace(rope_theta=500.0), Compute(), make_optimizer(1e-3), mesh)
    with pytest.raises(ValueError, match=r"does not have the architecture of the run's model \(checkpoint vs run: "
                                         r"rope_theta: 10000.0 vs 500.0\)"):
        other.init_state(0, init_from=str(exported))


def test_overwrite_replaces_only_an_empty_dir_or_a_previous_export(workdir, tmp_path, capsys):
    import stat

    from phi_jax import from_pretrained
    from tools import export_hf as tool

    previous = export_hf(str(workdir), str(tmp_path / "model"), step=10)
    replaced = export_hf(str(workdir), str(previous), step=20, overwrite=True)  # a previous export: replaced

    np.testing.assert_array_equal(np.asarray(from_pretrained(replaced).embed_tokens[...]),
                                  np.asarray(load_model(workdir, 20)[0].embed_tokens[...]))
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(replaced.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in replaced.iterdir()} == {0o666 & ~umask}

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's own file")
    with pytest.raises(FileExistsError, match=r"mine is not a phi_jax export \(notes.txt\); overwriting replaces only"):
        export_hf(str(workdir), str(mine), overwrite=True)
    (replaced / "my_eval.json").write_text("{}")  # a file added to a previous export is a user's too
    with pytest.raises(FileExistsError, match=r"holds files the previous export did not write \(my_eval.json\)"):
        export_hf(str(workdir), str(replaced), overwrite=True)
    assert (mine / "notes.txt").read_text() == "a user's own file" and (replaced / "my_eval.json").exists()
    (tmp_path / "empty").mkdir()
    export_hf(str(workdir), str(tmp_path / "empty"), overwrite=True)  # an empty directory: replaced
    assert (tmp_path / "empty" / "model.safetensors").exists()

    with pytest.raises(SystemExit):
        tool.main(["--help"])
    assert "previous export" in " ".join(capsys.readouterr().out.split())



def test_the_command_lines_run_as_modules(workdir, tmp_path):
    """`python -m tools.export_hf` from the checkout (no sys.path edits); a bad --model is one line naming the
    accepted forms (phi_jax.cli.run), before anything is written."""
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run([sys.executable, "-m", "tools.export_hf", f"--model={workdir}", f"--out={tmp_path / 'out'}",
                         "--step=20"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()
    bad = subprocess.run([sys.executable, "-m", "tools.export_hf", f"--model={tmp_path / 'missing'}",
                          f"--out={tmp_path / 'wd'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'missing'} is not a model directory")
    assert not (tmp_path / "wd").exists()
