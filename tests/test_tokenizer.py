"""Tokenizers: SentencePiece round-trips real source code exactly; HF tokenizer.json loads with its eos."""

import pytest

from phi_jax.data.corpus import stdlib_files
from phi_jax.data.tokenizer import EOS_PIECE, HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

TABBED = "def f(x):\n\tif x:  \n\t\treturn x\t# tab\n\n\treturn None   \n" * 3


def _text(path):
    return path.read_bytes().decode("utf-8")


def _pick(files, predicate, n):
    """Up to n files whose text satisfies `predicate` (fewer in a small library)."""
    out = []
    for f in files:
        try:
            if predicate(_text(f)):
                out.append(f)
        except UnicodeDecodeError:
            continue
        if len(out) == n:
            break
    return out


HELD_OUT = 20


def split(files):
    """(train, held-out) files of a standard library of any size: 9 to train on, 20 held out spread over the
    whole library (a stride from its size: Debian's python3 ships the standard library without its test suite,
    about a third of the files)."""
    files = [f for f in files if 2_000 < f.stat().st_size < 40_000]
    # CPython's own sources hold no tabs or trailing spaces (its style checks forbid them): those are covered by
    # the synthetic strings below; non-ASCII files are real.
    unicode = _pick(files, lambda t: not t.isascii(), 6)
    train = list(dict.fromkeys(unicode[:3] + files[:6]))
    rest = [f for f in files if f not in train and f not in unicode]
    stride = max(1, len(rest) // (HELD_OUT + 5))
    return train, list(dict.fromkeys(unicode[3:] + rest[::stride]))[:HELD_OUT]


@pytest.fixture(scope="module")
def stdlib():
    return split(stdlib_files())


def test_the_held_out_files_do_not_depend_on_the_size_of_the_standard_library():
    """This interpreter's standard library, the same without its test suite (as Debian's python3 ships it: 668 .py
    files where python.org's build has 1,790) and a third of it: 20 held-out files from each."""
    full = stdlib_files()
    without_tests = [f for f in full if not {"test", "tests", "idle_test"} & set(f.parts)]
    for files in (full, without_tests, full[::3]):
        train, held_out = split(files)
        assert len(held_out) == HELD_OUT and not set(train) & set(held_out)


@pytest.fixture(scope="module")
def sp(stdlib, tmp_path_factory):
    train, _ = stdlib
    texts = [_text(f) for f in train] + [TABBED]
    path = train_sentencepiece(texts, tmp_path_factory.mktemp("sp") / "code", 800)
    return load_tokenizer(path)


def test_sentencepiece_round_trips_stdlib_exactly(sp, stdlib):
    _, held_out = stdlib
    assert len(held_out) == HELD_OUT and any(not _text(f).isascii() for f in held_out)
    for f in held_out:
        text = _text(f)
        assert sp.decode(sp.encode(text)) == text, f


def test_sentencepiece_round_trips_whitespace_and_unicode(sp):
    for text in [TABBED, "\tif x:\n\t\treturn  1   \n\n", "  \n \r\n", "s = 'héllo, 世界 🐍'\n", "x=1234567890\n", ""]:
        assert sp.decode(sp.encode(text)) == text


def test_sentencepiece_interface(sp):
    assert isinstance(sp, SentencePieceTokenizer)
    assert sp.vocab_size == 800
    assert sp._sp.id_to_piece(sp.eos_id) == EOS_PIECE
    assert sp.bos_id is None
    ident = sp.identity()
    assert ident["kind"] == "sentencepiece" and ident["path"] == "code.model" and ident["vocab_size"] == 800
    assert len(ident["sha256"]) == 64
    assert max(sp.encode("def f():\n    pass\n")) < sp.vocab_size


def test_training_is_reproducible(stdlib, sp, tmp_path):
    train, _ = stdlib
    texts = [_text(f) for f in train] + [TABBED]
    again = load_tokenizer(train_sentencepiece(texts, tmp_path / "again", 800, num_threads=1))
    assert again.identity()["sha256"] == sp.identity()["sha256"]


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS_PIECE],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))

    hf = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(hf, HFTokenizer)
    assert hf.eos_id == 0 and hf.vocab_size == tok.get_vocab_size()
    text = "def g(y):\n\treturn y * 2  \n"
    assert hf.decode(hf.encode(text)) == text
    assert hf.identity()["kind"] == "huggingface"
    assert load_tokenizer(tmp_path).path.name == "tokenizer.json"  # a directory holding tokenizer.json


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match="Unknown tokenizer file type"):
        load_tokenizer(tmp_path / "vocab.txt")
