"""Hugging Face tokenizer files for an exported model: a SentencePiece BPE model as a `tokenizers` tokenizer.json.

The conversion follows transformers' own SpmConverter for BPE models (Llama's): the vocabulary is the
SentencePiece pieces by id, merges are every split of a piece into two pieces of the vocabulary ranked by the merged
piece's id (SentencePiece BPE merges by piece score, and scores fall with id), `byte_fallback` maps unknown
characters to <0xXX> pieces, and the normalizer only replaces " " with "▁" (the settings phi_jax trains code
tokenizers with: identity normalization, no dummy prefix, whitespace kept). User-defined and control pieces become
added tokens, matched before the model as SentencePiece does.
"""

from __future__ import annotations

import json
import os

from phi_jax.paths import user_path

SPIECE_UNDERLINE = "▁"


def _sentencepiece(model_file: str | os.PathLike):
    """A SentencePiece processor of a .model file, local or gs:// (read as bytes: sentencepiece opens local files
    only)."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=user_path(model_file).read_bytes())


def sentencepiece_to_tokenizer_json(sp) -> str:
    """The tokenizer.json text equivalent to a SentencePiece BPE model with byte fallback (a processor)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    types = _piece_types(sp)
    special = [i for i in range(n) if types[i] in ("control", "unknown")]
    user_defined = [i for i in range(n) if types[i] == "user_defined"]
    mergeable = {p: i for p, i in vocab.items() if types[i] == "normal"}
    merges = []
    for piece, i in mergeable.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPIECE_UNDERLINE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    # User-defined pieces (e.g. "<|endoftext|>", "\n") are never split; the end-of-text one is also special.
    tok.add_tokens([AddedToken(sp.id_to_piece(i), special=False, normalized=False, rstrip=False, lstrip=False)
                    for i in user_defined if sp.id_to_piece(i) != "<|endoftext|>"])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                            for i in user_defined if sp.id_to_piece(i) == "<|endoftext|>"])
    return tok.to_str(pretty=True)


def _piece_types(sp) -> list[str]:
    """Each piece's type name (normal, unknown, control, user_defined, unused, byte) from the model proto."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise ValueError("Only SentencePiece BPE models convert to a BPE tokenizer.json; this one is "
                         f"{pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)}.")
    if proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.name not in ("identity", ""):
        raise ValueError("The conversion covers identity normalization without a dummy prefix (phi_jax's code "
                         f"tokenizers); this model has {proto.normalizer_spec.name!r}, "
                         f"add_dummy_prefix={proto.normalizer_spec.add_dummy_prefix}.")
    return [pb.ModelProto.SentencePiece.Type.Name(p.type).lower() for p in proto.pieces]


def eos_piece(sp) -> str:
    """The end-of-text piece of a SentencePiece processor: phi_jax's "<|endoftext|>", else the model's eos."""
    eot = sp.piece_to_id("<|endoftext|>")
    return "<|endoftext|>" if eot != sp.unk_id() else sp.id_to_piece(sp.eos_id())


def hf_tokenizer_files(tokenizer_file: str | os.PathLike, *, model_max_length: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for a phi_jax tokenizer file (local or
    gs://)."""
    path = user_path(tokenizer_file)
    if path.suffix == ".json":
        tokenizer_json = path.read_text(encoding="utf-8")
        added = {t["content"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
        eos = next((t for t in ("<|endoftext|>", "</s>", "<eos>") if t in added), None)
        bos = next((t for t in ("<s>", "<bos>") if t in added), None)
        unk = next((t for t in ("<unk>",) if t in added), None)
    else:
        sp = _sentencepiece(path)  # read (from a bucket, downloaded) and parsed once
        tokenizer_json = sentencepiece_to_tokenizer_json(sp)
        eos = eos_piece(sp)
        bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
        unk = sp.id_to_piece(sp.unk_id())
    special = {k: v for k, v in (("eos_token", eos), ("bos_token", bos), ("unk_token", unk)) if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, **special}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}
