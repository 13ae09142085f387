"""The evaluate and generate command lines: default window length, what they report, and checks before output."""

import numpy as np
import pytest

from phi_jax import evaluate, generate
from phi_jax.config import PhiConfig
from phi_jax.model import init_model
from tests.hf_reference import make_hf_phi


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A 32-token-context Hugging Face phi directory with a 512-piece SentencePiece tokenizer of its own."""
    from runs import documents

    from phi_jax.data.tokenizer import train_sentencepiece

    out = make_hf_phi(tmp_path_factory.mktemp("hf") / "phi", seed=1, max_position_embeddings=32)
    sp = train_sentencepiece(documents(3), tmp_path_factory.mktemp("sp") / "sp", vocab_size=512)
    (out / "tokenizer.model").write_bytes(sp.read_bytes())
    return out


def test_default_seq_len_is_the_training_one_else_the_context(tmp_path, hf_dir):
    from phi_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "run", async_save=False)
    ckpt.save(5, {"w": np.zeros(2, np.float32)}, {"run": {"seq_len": 48}})
    ckpt.close()
    model = init_model(PhiConfig.preset("tiny"))
    assert evaluate.default_seq_len(tmp_path / "run", model) == (48, "the training seq_len")
    assert evaluate.default_seq_len(hf_dir, model) == (1024, "the model's context, max_position_embeddings")


def test_evaluate_says_what_it_measured(hf_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 8)
    evaluate.main(["--model", str(hf_dir), "--text_file", str(text), "--batch_size", "2"])
    out = capsys.readouterr().out
    assert f"{hf_dir} on {text}: " in out
    assert "windows of 32 tokens (the model's context, max_position_embeddings)" in out
    assert "perplexity " in out


def test_generate_checks_the_prompt_before_echoing_it(hf_dir, capsys):
    with pytest.raises(ValueError, match="longer than the model's context of 32"):
        generate.main(["--model", str(hf_dir), "--prompt", "def f(x):\n    return x + 1\n" * 10])
    assert capsys.readouterr().out == ""


def test_generate_model_error_names_what_is_accepted(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate.main(["--model", str(tmp_path / "missing"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert f"--model={tmp_path / 'missing'}: {tmp_path / 'missing'} is not a model directory (it does not exist)" in err
    assert ("pass a training workdir (it holds checkpoints/), a Hugging Face phi directory (config.json and "
            "model.safetensors; local or gs://), or a Hugging Face Hub id such as microsoft/phi-1_5") in err
