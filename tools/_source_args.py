"""Command-line flags naming a document source, shared by tools.prepare_data and tools.train_tokenizer, and their
argument parser: a bad flag is one line, like every other error of the entry points."""

import argparse
import glob
import math
import os

from phi_jax.cli import OneLineParser, bounded_int  # noqa: F401 (the entry points' parser and types)
from phi_jax.data.corpus import SOURCES, SkipReport, documents

positive_int = bounded_int(1, 2**63 - 1)


def fraction(text: str) -> float:
    """A number in [0, 1): NaN, inf and out-of-range values are refused by the parser."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number in [0, 1)")
    return value


def add_source_args(p: argparse.ArgumentParser, sft: bool = False) -> None:
    """The source flags; `sft` adds --source=sft (JSONL of prompt/completion or messages: phi_jax/data/sft.py)."""
    p.add_argument("--source", choices=[*SOURCES, "sft"] if sft else SOURCES, default="stdlib",
                   help="where the documents come from" + ("; sft: supervised fine-tuning records from --jsonl, "
                                                            "shards with a loss mask" if sft else ""))
    p.add_argument("--glob", action="append", default=[], help="file pattern for --source=files (repeatable; ** ok)")
    p.add_argument("--jsonl", action="append", default=[],
                   help="JSON Lines file or glob pattern ('out/part-*.jsonl') for --source=jsonl or sft (repeatable)")
    p.add_argument("--tfds_name", default="", help="TFDS dataset name for --source=tfds (array_record format)")
    p.add_argument("--tfds_data_dir", default=None, help="TFDS data_dir")
    p.add_argument("--tfds_split", default="train", help="TFDS split")
    p.add_argument("--text_field", default="text", help="record field holding the text (jsonl, tfds)")
    p.add_argument("--strict", action="store_true", help="a binary or non-UTF-8 file is an error (default: skipped "
                   "and counted)")
    p.add_argument("--skip_bad_lines", action="store_true", help="skip and count malformed JSONL lines (default: an "
                   "error naming file:line)")


def expand_jsonl(patterns: list[str]) -> list[str]:
    """Each --jsonl as the sorted files its pattern matches; a path that matches nothing stays as given (opening it
    then names it)."""
    return [f for p in patterns for f in (sorted(glob.glob(os.path.expanduser(p))) or [p])]


def check_source_args(a: argparse.Namespace) -> None:
    """What the source flags need, checked before any document is read."""
    flag, given = {"files": ("glob", a.glob), "jsonl": ("jsonl", a.jsonl),
                   "tfds": ("tfds_name", [a.tfds_name])}.get(a.source, ("", ["stdlib"]))
    if not any(g.strip() for g in given):
        raise ValueError(f"--source={a.source} needs --{flag}=... (a non-empty value).")
    if a.source in ("jsonl", "tfds") and not a.text_field:
        raise ValueError("--text_field is empty: name the record field holding the text (default: text).")


def source_documents(a: argparse.Namespace, report: SkipReport | None = None):
    if a.source == "sft":
        from phi_jax.data.sft import sft_documents

        if not a.jsonl:
            raise ValueError("--source=sft needs --jsonl.")
        return sft_documents(expand_jsonl(a.jsonl), report, a.skip_bad_lines)
    return documents(a.source, globs=a.glob, jsonl=expand_jsonl(a.jsonl), tfds_name=a.tfds_name,
                     tfds_data_dir=a.tfds_data_dir, tfds_split=a.tfds_split, text_field=a.text_field, report=report,
                     strict=a.strict, skip_bad_lines=a.skip_bad_lines)


def describe(a: argparse.Namespace) -> str:
    detail = {"files": a.glob, "jsonl": a.jsonl, "sft": a.jsonl, "tfds": f"{a.tfds_name}[{a.tfds_split}]",
              "stdlib": ""}[a.source]
    return f"{a.source} {detail}".strip()
