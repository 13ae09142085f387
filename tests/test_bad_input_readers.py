"""The readers of a model answer bad input with their exit status and one line, never a traceback or a number that
means nothing (tests/bad_input.py holds the reusable tables): each flag of generate, evaluate and export_hf given
each class of bad value, the inputs that used to give a meaningless perplexity or a garbled generation, and each
file of a Hugging Face directory given each kind of damage. All in-process, on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bad_input import BAD_VALUES, DAMAGES, call, check, damage

from phi_jax import evaluate, generate
from phi_jax.config import PhiConfig
from phi_jax.data.prepare import prepare_shards
from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from phi_jax.hf.io import save_pretrained
from phi_jax.loading import load
from phi_jax.model import init_model
from tools import export_hf

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

DOCS = [f"def f{i}(x):\n    return x * {i} + {'y' * (i % 7)!r}\n" * (1 + i % 3) for i in range(60)]
NUMBER_CLASSES = ("negative", "zero", "nan", "inf", "huge", "empty", "wrong type")
CONTEXT = 64  # the fixture model's context: short windows keep every accepted case fast


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny Hugging Face phi directory with its 300-id SentencePiece tokenizer (the model embeds 512 ids), a
    sharded copy, shards made with its tokenizer and with another one, a text file, and a 1000-id tokenizer."""
    root = tmp_path_factory.mktemp("readers")
    tok = train_sentencepiece(DOCS, root / "sp300", 300)
    other = train_sentencepiece(DOCS[:50], root / "sp320", 320)
    big = train_sentencepiece([f"{d}# {''.join(chr(0x4e00 + (i * 7 + j) % 400) for j in range(5))}\n"
                               for i, d in enumerate(DOCS * 3)], root / "sp1000", 1000)
    model = init_model(PhiConfig.preset("tiny").replace(max_position_embeddings=CONTEXT))
    save_pretrained(model, root / "hf", extra_files={"tokenizer.model": tok.read_bytes()})
    save_pretrained(model, root / "hf_sharded", max_shard_bytes=200_000, extra_files={"tokenizer.json": (
        _hf_tokenizer_json(root))})
    prepare_shards(DOCS, load_tokenizer(tok), root / "shards", val_fraction=0.1, docs_per_shard=20, workers=1)
    prepare_shards(DOCS, load_tokenizer(other), root / "shards_other", val_fraction=0.1, docs_per_shard=20, workers=1)
    (root / "text.txt").write_text("".join(DOCS[:4]))
    return {"root": root, "hf": root / "hf", "hf_sharded": root / "hf_sharded", "shards": root / "shards",
            "shards_other": root / "shards_other", "text": root / "text.txt", "big_tok": big, "tok": tok}


def _hf_tokenizer_json(root: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    return hf.to_str()


def _table(main, base: dict[str, str], flags: dict[str, tuple[str, set[str]]], tmp_path: Path) -> list[str]:
    """Runs `main` with `base` plus each flag given each class of its kind ("number": every class; "string": empty
    and 'abc'; "switch": a value) and an unknown flag. A class listed as accepted must exit 0; every other one must
    exit 1 or 2 (a usage error) with one line naming the flag (or the file it names). Returns the problems."""
    problems = []
    cases = [("--bogus", "unknown key", "1", False)]
    for flag, (kind, accepted) in flags.items():
        classes = {"number": NUMBER_CLASSES, "string": ("empty", "wrong type"), "switch": ("wrong type",)}[kind]
        cases += [(flag, cls, BAD_VALUES[cls], cls in accepted) for cls in classes]
    for i, (flag, cls, value, accepted) in enumerate(cases):
        args = {**base, flag: value}
        argv = [f"{k}={v}" if v is not None else k for k, v in args.items()]
        argv = [a.replace("{i}", str(i)) for a in argv]
        outcome = call(main, argv)
        expected = 0 if accepted else (outcome.code if outcome.code in (1, 2) else 1)
        if why := check(outcome, expected):
            problems.append(f"{flag}={value!r} ({cls}): {why}")
        elif not accepted and flag.strip("-") not in outcome.message and (value not in outcome.message or not value):
            problems.append(f"{flag}={value!r} ({cls}): the line names neither the flag nor the value: "
                            f"{outcome.message}")
    return problems


def test_generate_answers_every_flag_and_class_in_one_line(files, tmp_path, capsys):
    base = {"--model": str(files["hf"]), "--prompt": "def f(x):", "--max_new_tokens": "1"}  # 1: no decode step
    flags = {
        "--model": ("string", set()), "--prompt": ("string", {"empty", "wrong type"}),  # "" starts from BOS/EOS
        "--max_new_tokens": ("number", set()), "--temperature": ("number", {"zero"}), "--top_k": ("number", {"zero"}),
        "--top_p": ("number", set()), "--seed": ("number", {"zero"}), "--dtype": ("string", set()),
        "--step": ("number", set()),  # (a Hugging Face directory has no steps: named as such)
        "--tokenizer": ("string", set()), "--json": ("switch", set()),
    }
    problems = _table(generate.main, base, flags, tmp_path)
    capsys.readouterr()
    assert not problems, problems


def test_evaluate_answers_every_flag_and_class_in_one_line(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out=abc writes here
    base = {"--model": str(files["hf"]), "--text_file": str(files["text"]), "--batch_size": "2"}
    flags = {
        "--model": ("string", set()), "--text_file": ("string", set()), "--split": ("string", set()),
        "--max_tokens": ("number", {"zero"}), "--seq_len": ("number", {"zero"}), "--batch_size": ("number", set()),
        "--dtype": ("string", set()), "--step": ("number", set()), "--tokenizer": ("string", set()),
        "--out": ("string", {"wrong type"}),
    }
    problems = _table(evaluate.main, base, flags, tmp_path)
    problems += _table(evaluate.main, {"--model": str(files["hf"]), "--data_dir": str(files["shards"])},
                       {"--data_dir": ("string", set()), "--split": ("string", set())}, tmp_path)
    assert json.loads((tmp_path / "abc").read_text())["tokens"] > 100
    assert not problems, problems


def test_export_hf_answers_every_flag_and_class_in_one_line(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"--model": str(files["hf"]), "--out": str(tmp_path / "out{i}")}
    flags = {"--model": ("string", set()), "--out": ("string", {"wrong type"}), "--step": ("number", set()),
             "--dtype": ("string", set()), "--tokenizer": ("string", set()), "--overwrite": ("switch", set()),
             "--merge_lora": ("switch", set()), "--peft": ("switch", set())}
    problems = _table(export_hf.main, base, flags, tmp_path)
    assert (tmp_path / "abc" / "model.safetensors").is_file()
    assert not problems, problems


# ---------------------------------------------------------------------------------------------------------------
# evaluate: the inputs that used to give a number that means nothing.


@pytest.mark.parametrize("content,args,message", [
    (b"", [], "--text_file={text} is empty: there is nothing to evaluate"),
    (b"  \n\n", [], "--text_file={text} is empty (whitespace only)"),
    (b"d", [], "--text_file={text} holds 1 token(s) to evaluate: the first token is context only"),
    (b"def f(x):\n    return x\n", ["--max_tokens=1"], "--max_tokens=1: the first token is context only"),
    (b"def f(x):\n    return x\n", ["--max_tokens=-1"], "argument --max_tokens: '-1' must be an integer in [0, "),
    (b"def f(x):\n", ["--batch_size=0"], "argument --batch_size: '0' must be an integer in [1, "),
    (b"def f(x):\n", ["--seq_len=-5"], "argument --seq_len: '-5' must be an integer in [0, "),
    (b"def f(x):\n", [f"--seq_len={CONTEXT + 1}"], f"seq_len={CONTEXT + 1} must be in [1, {CONTEXT}]"),
    (b"\xc6\x01\xff binary", [], "--text_file={text} is not UTF-8 text (byte 0xc6 at offset 0)"),
], ids=["empty", "whitespace", "one-token", "max-tokens-1", "max-tokens-negative", "batch-0", "seq-len-negative",
        "seq-len-past-context", "binary"])
def test_evaluate_refuses_what_has_no_perplexity(files, tmp_path, content, args, message):
    text = tmp_path / "t.txt"
    text.write_bytes(content)
    outcome = call(evaluate.main, [f"--model={files['hf']}", f"--text_file={text}", *args])
    assert check(outcome, outcome.code if outcome.code in (1, 2) else 1, message.format(text=text)) is None, outcome


def test_evaluate_refuses_shards_of_another_tokenizer_like_training(files):
    outcome = call(evaluate.main, [f"--model={files['hf']}", f"--data_dir={files['shards_other']}"])
    assert check(outcome, 1, "The shards were made with tokenizer sp320.model", "but the given tokenizer is "
                 "tokenizer.model", "evaluate on shards made with the model's tokenizer") is None, outcome
    ok = call(evaluate.main, [f"--model={files['hf']}", f"--data_dir={files['shards']}", "--batch_size=2"])
    assert ok.code == 0, ok


def test_evaluate_tokens_refuses_fewer_than_two_tokens_and_foreign_ids(files):
    """The library function too: it used to score padding (an empty stream) or nothing (one token)."""
    model, _ = load(files["hf"])
    for tokens in ([], [5]):
        with pytest.raises(ValueError, match=r"the first token is context only, so perplexity needs at least 2"):
            evaluate.evaluate_tokens(model, np.asarray(tokens, np.int32), seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match=r"Token ids \[600\] are outside the model's vocabulary of 512"):
        evaluate.evaluate_tokens(model, np.asarray([3, 600, 4], np.int32), seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        evaluate.evaluate_tokens(model, np.arange(10, dtype=np.int32), seq_len=8, batch_size=0)


# ---------------------------------------------------------------------------------------------------------------
# generate: sampling settings and tokenizers that do not fit the model.


def test_sampling_settings_are_checked_before_any_work(files):
    model, _ = load(files["hf"], scan_layers=False)
    sampler = generate.Sampler(model)
    bad = [dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-1.0),
           dict(max_new_tokens=-5), dict(max_new_tokens=2.5), dict(seed=99999999999999999999), dict(seed=-1),
           dict(top_p=float("nan")), dict(top_k=2**40)]
    for kw in bad:
        key = next(iter(kw))
        with pytest.raises(ValueError, match=rf"^{key}=.* must be"):
            sampler([[3, 4]], **{"max_new_tokens": 2, **kw})
    assert sampler.compilations() == {"prefill": 0, "decode_step": 0}  # refused before compiling
    assert sampler([[3, 4]], max_new_tokens=0) == [[]]  # nothing asked, nothing done (the command line wants >= 1)


def test_a_tokenizer_smaller_than_the_embedding_never_gets_an_id_it_lacks(files):
    """The tiny model embeds 512 ids, its tokenizer has 300. Near-uniform sampling (temperature 1000) over 24 tokens
    x 4 rows would pick an id >= 300 with probability 1 - (300/512)^96 without the limit."""
    model, tok = load(files["hf"], scan_layers=False)
    assert (tok.vocab_size, model.cfg.vocab_size) == (300, 512)
    sampler = generate.Sampler(model)
    out = sampler([[3, 4, 5]] * 4, max_new_tokens=24, temperature=1000.0, seed=1, num_ids=tok.vocab_size)
    ids = np.asarray(out)
    assert ids.max() < 300 and len(np.unique(ids)) > 40, ids  # sampled widely, within the tokenizer's ids
    unlimited = np.asarray(sampler([[3, 4, 5]] * 4, max_new_tokens=24, temperature=1000.0, seed=1))
    assert unlimited.max() >= 300  # the model alone does produce them
    texts = generate.generate(sampler, tok, ["def"] * 4, max_new_tokens=24, temperature=1000.0, seed=2)
    assert len(texts) == 4 and all(texts)  # decoded: no id the tokenizer lacks (it used to raise IndexError here)
    assert sampler.compilations() == {"prefill": 1, "decode_step": 1}  # the limit is a value, not a new program


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_the_weights(files, monkeypatch):
    import phi_jax.loading as loading

    monkeypatch.setattr(loading, "from_pretrained", lambda *a, **k: pytest.fail("the weights were read"))
    for main, extra in ((generate.main, ["--prompt=x"]), (evaluate.main, [f"--text_file={files['text']}"])):
        outcome = call(main, [f"--model={files['hf']}", f"--tokenizer={files['big_tok']}", *extra])
        assert check(outcome, 1, f"--tokenizer={files['big_tok']} has 1000 ids but the model embeds only 512") \
            is None, outcome


# ---------------------------------------------------------------------------------------------------------------
# Damaged files of a Hugging Face directory, as generate, evaluate, export_hf and --config.init_from_hf read them
# (phi_jax.loading): one line naming the file.

HF_FILES = {
    "model.safetensors": ("hf", "model.safetensors"),
    "config.json": ("hf", "config.json"),
    "tokenizer.model": ("hf", "tokenizer.model"),
    "tokenizer.json": ("hf_sharded", "tokenizer.json"),
    "model.safetensors.index.json": ("hf_sharded", "model.safetensors.index.json"),
    "a safetensors shard": ("hf_sharded", "model-00002-of-00004.safetensors"),
}


def _load_error(path: Path) -> str:
    outcome = call(lambda argv: load(path), [])
    return outcome.message if outcome.code == 1 else f"{outcome.code}: {outcome.message}"


@pytest.mark.parametrize("what,kind", [(w, k) for w in HF_FILES for k in DAMAGES])
def test_a_damaged_hugging_face_file_is_named_in_one_line(what, kind, files, tmp_path):
    source, name = HF_FILES[what]
    root = tmp_path / "copy"
    shutil.copytree(files[source], root)
    assert (root / name).is_file(), sorted(p.name for p in root.iterdir())
    damage(root / name, kind)
    result = _load_error(root)
    assert result.startswith("error: ") and name in result and "\n" not in result, result


@pytest.mark.parametrize("content,message", [
    ({"model_type": "phi"}, "config.json: config.json (model_type 'phi') has no 'num_attention_heads'"),
    ({"model_type": "phi", "num_attention_heads": "two", "hidden_size": 64, "vocab_size": 512,
      "intermediate_size": 256, "num_hidden_layers": 2}, "config.json holds a value of the wrong type"),
    ({"model_type": "phi", "num_attention_heads": 2, "hidden_size": 64, "vocab_size": 512.5,
      "intermediate_size": 256, "num_hidden_layers": 2}, "vocab_size=512.5 must be integers"),
    ({"model_type": "llama"}, "config.json: Unsupported model_type 'llama'"),
], ids=["incomplete", "string-size", "float-size", "other-model"])
def test_a_config_json_of_the_wrong_content_is_named(files, tmp_path, content, message):
    root = tmp_path / "copy"
    shutil.copytree(files["hf"], root)
    (root / "config.json").write_text(json.dumps(content))
    result = _load_error(root)
    assert result.startswith(f"error: {root / 'config.json'}") and message in result, result


def test_export_and_init_from_hf_name_a_damaged_file(files, tmp_path):
    """export_hf reads the directory as generate does; so does the trainer's init_from_hf (Trainer.pretrained_params),
    checked here through the same reader without compiling a train step."""
    root = tmp_path / "copy"
    shutil.copytree(files["hf"], root)
    damage(root / "model.safetensors", "truncated")
    outcome = call(export_hf.main, [f"--model={root}", f"--out={tmp_path / 'out'}"])
    assert check(outcome, 1, f"{root / 'model.safetensors'} is not a valid safetensors file") is None, outcome
    assert not (tmp_path / "out").exists()

    import jax

    from phi_jax.config import Compute
    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import make_mesh
    from phi_jax.trainer import build_trainer

    cfg = PhiConfig.preset("tiny").replace(max_position_embeddings=CONTEXT)
    trainer = build_trainer(cfg, Compute(), make_optimizer(1e-3), make_mesh(devices=jax.devices()[:1]))
    with pytest.raises(ValueError, match=rf"^{root / 'model.safetensors'} is not a valid safetensors file"):
        trainer.pretrained_params(str(root))


def test_init_from_hf_on_a_workdir_in_use_is_refused_before_anything_is_written(files, tmp_path):
    """A live trainer's lock (taken here, never released) stops a run that would start from Hugging Face weights
    before it reads them or writes checkpoint 0 (the lock is taken before the data, the compile and the weights)."""
    from runs import tiny_config

    from phi_jax.train import train
    from phi_jax.workdir_lock import WorkdirLock, WorkdirLockedError

    hf_tiny = tmp_path / "hf_tiny"  # the tiny preset exactly: without the lock, this run would start from it
    save_pretrained(init_model(PhiConfig.preset("tiny")), hf_tiny)
    workdir = tmp_path / "run"
    workdir.mkdir()
    WorkdirLock(workdir).acquire()
    before = sorted(p.name for p in workdir.iterdir())
    c = tiny_config(files["shards"], init_from_hf=str(hf_tiny), total_steps=1, eval_every=0)
    with pytest.raises(WorkdirLockedError, match=rf"{workdir} is in use by another trainer"):
        train(c, workdir)
    assert sorted(p.name for p in workdir.iterdir()) == before == ["lock.json"]


def test_init_from_hf_names_a_damaged_file_before_compiling(files, tmp_path, caplog):
    """The trainer reads the pretrained weights after compiling its step; their config and file headers are checked
    at start-up, so a damaged file is one line before any compilation."""
    import logging

    from runs import tiny_config

    from phi_jax.train import train

    hf_tiny = tmp_path / "hf_tiny"
    save_pretrained(init_model(PhiConfig.preset("tiny")), hf_tiny)
    damage(hf_tiny / "model.safetensors", "truncated")
    caplog.set_level(logging.INFO, logger="phi_jax")
    with pytest.raises(ValueError, match=rf"^{hf_tiny / 'model.safetensors'} is not a valid safetensors file"):
        train(tiny_config(files["shards"], init_from_hf=str(hf_tiny), total_steps=1), tmp_path / "run")
    assert not [m for m in caplog.messages if "compiling" in m]
    assert not (tmp_path / "run" / "checkpoints").exists()
