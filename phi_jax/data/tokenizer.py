"""Tokenizers behind one small interface: SentencePiece (.model) and Hugging Face `tokenizers` (.json).

`train_sentencepiece` trains a BPE model whose encode/decode round-trips source code exactly: no normalisation,
whitespace and newlines kept as pieces, unknown characters as bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from etils import epath

from phi_jax.paths import is_url, user_path

EOS_PIECE = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    bos_id: int | None
    path: Path

    def identity(self) -> dict: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Base:
    kind = ""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._sha256 = file_sha256(self.path)

    def identity(self) -> dict:
        """What names this tokenizer in metadata and checkpoints: two tokenizers are the same iff sha256 matches."""
        return {"kind": self.kind, "path": self.path.name, "sha256": self._sha256, "vocab_size": self.vocab_size}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(_Base):
    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        super().__init__(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:  # a truncated, empty or foreign file: "ParseFromArray failed"
            raise ValueError(f"{self.path} is not a valid SentencePiece model ({' '.join(str(e).split())[:200]}): "
                             "train one with python -m tools.train_tokenizer, or copy it again.") from None
        self.vocab_size = int(self._sp.vocab_size())
        eos = self._sp.piece_to_id(EOS_PIECE)
        if eos == self._sp.unk_id() or eos < 0:  # piece_to_id returns unk for unknown pieces
            eos = self._sp.eos_id()
        if eos < 0:
            raise ValueError(f"SentencePiece model {self.path} has no eos piece ({EOS_PIECE!r} or </s>).")
        self.eos_id = int(eos)
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self):  # the SentencePiece processor does not pickle; rebuild from the file in workers
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


class HFTokenizer(_Base):
    """A Hugging Face `tokenizer.json` (e.g. phi-1.5's CodeGen BPE: 50295 ids, eos `<|endoftext|>` = 50256)."""

    kind = "huggingface"

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HF

        super().__init__(path)
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as e:  # tokenizers raises its own Exception for a file that is not a tokenizer.json
            raise ValueError(f"{self.path} is not a valid Hugging Face tokenizer.json "
                             f"({' '.join(str(e).split())[:200]}): copy it again.") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        eos = self._tok.token_to_id(EOS_PIECE)
        if eos is None:
            eos = next((self._tok.token_to_id(t) for t in ("</s>", "<eos>") if self._tok.token_to_id(t) is not None),
                       None)
        if eos is None:
            raise ValueError(f"{self.path} has no end-of-text token ({EOS_PIECE!r}, </s> or <eos>).")
        self.eos_id = int(eos)
        bos = self._tok.token_to_id("<s>")
        self.bos_id = None if bos is None else int(bos)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


# The tokenizer files a model directory may hold, in order of preference (a Hugging Face directory's own, or what
# an export carries).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def tokenizer_in(directory: str | os.PathLike) -> epath.Path | None:
    """The tokenizer file inside a model directory (local or gs://), or None if it holds none."""
    directory = user_path(directory)
    return next((directory / n for n in TOKENIZER_FILES if (directory / n).is_file()), None)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """SentencePiece for `*.model`, Hugging Face `tokenizers` for `*.json` (a directory: the one it holds); a gs://
    file is read into a local copy (both libraries read local files only)."""
    if is_url(path):
        path = user_path(path)
        if path.is_dir() and (found := tokenizer_in(path)) is not None:
            path = found
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer file {path} does not exist: pass a SentencePiece .model or a Hugging "
                                    "Face tokenizer.json.")
        local = Path(tempfile.mkdtemp(prefix="phi_jax-tokenizer-")) / path.name
        local.write_bytes(path.read_bytes())
        path = local
    path = Path(path)
    if path.is_dir() and (found := tokenizer_in(path)) is not None:
        path = Path(found)
    if not path.is_file():
        raise FileNotFoundError(f"Tokenizer file {path} does not exist: pass a SentencePiece .model or a Hugging Face "
                                "tokenizer.json (python -m tools.train_tokenizer trains one).")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise ValueError(f"Unknown tokenizer file type {path.name!r}: expected a SentencePiece .model or a Hugging Face "
                     "tokenizer.json.")


def _chunks(texts: Iterable[str], max_chars: int) -> Iterable[str]:
    """Multi-line pieces of at most `max_chars` characters, cut at line ends, so training sees real indentation."""
    for text in texts:
        chunk: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if size + len(line) > max_chars and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line[:max_chars])
            size += len(chunk[-1])
        if chunk:
            yield "".join(chunk)


# The pieces every model trained here holds whatever the text: unk, eos, the newline symbol and the 256 byte-fallback
# pieces. SentencePiece's BPE needs more than that to train at all.
MIN_VOCAB_SIZE = 260


def check_vocab_size(vocab_size) -> None:
    """A vocabulary train_sentencepiece can train: an int >= MIN_VOCAB_SIZE (before any text is read)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not \
            MIN_VOCAB_SIZE <= vocab_size < 2**31:
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer in [{MIN_VOCAB_SIZE}, 2**31) (the 256 byte "
                         "pieces, unk, eos, the newline and one per distinct character); 8192 is a good start for "
                         "code.")


def train_sentencepiece(texts: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int, *,
                        input_sentence_size: int = 200_000, max_sentence_length: int = 16384, seed: int = 0,
                        num_threads: int | None = None) -> Path:
    """Trains a code-exact BPE SentencePiece model on `texts`; writes `{model_prefix}.model` atomically.

    Settings (see docs/platform notes): identity normalisation, no dummy prefix, whitespace-only pieces, newline as a
    user symbol, byte fallback for unseen characters, digits split, `<|endoftext|>` as the eos piece.
    """
    import sentencepiece as spm

    check_vocab_size(vocab_size)
    out = Path(f"{model_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    sentences = list(_chunks(texts, max_sentence_length))
    if not sentences:
        raise ValueError("No training text for the tokenizer.")
    random.Random(seed).shuffle(sentences)
    sentences = sentences[:input_sentence_size]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".spm-") as tmp:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_prefix=os.path.join(tmp, "m"), vocab_size=vocab_size,
                model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
                allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
                max_sentence_length=max_sentence_length, character_coverage=0.9999, unk_id=0, bos_id=-1, eos_id=1,
                pad_id=-1, eos_piece=EOS_PIECE, hard_vocab_limit=False, shuffle_input_sentence=True,
                num_threads=num_threads or os.cpu_count() or 1, train_extremely_large_corpus=False,
                minloglevel=2)
        except RuntimeError as e:  # e.g. a vocabulary smaller than the characters the text holds
            if "required_chars" in str(e):
                chars = len(set().union(*map(set, sentences)))
                raise ValueError(f"vocab_size={vocab_size} is too small for this text: a model needs the "
                                 f"{MIN_VOCAB_SIZE - 1} fixed pieces (256 bytes, unk, eos, newline) plus one per "
                                 f"distinct character ({chars} here): choose vocab_size >= "
                                 f"{MIN_VOCAB_SIZE - 1 + chars}.") from None
            raise ValueError(f"SentencePiece could not train a vocabulary of {vocab_size} on this text: "
                             f"{' '.join(str(e).split())[:300]}. Choose another vocab_size.") from None
        proto = _canonical(Path(tmp, "m.model").read_bytes())
        Path(tmp, "c.model").write_bytes(proto)
        os.replace(os.path.join(tmp, "c.model"), out)
    return out


def _canonical(model: bytes) -> bytes:
    """The model without the machine-specific trainer settings (temp path, thread count), so its sha256 is the same
    wherever the same text trained it."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    for field in ("model_prefix", "num_threads"):
        proto.trainer_spec.ClearField(field)
    return proto.SerializeToString(deterministic=True)
