"""Supervised fine-tuning data: JSONL records -> token ids with a per-token loss mask.

A record is one JSON object per line, either
    {"prompt": "...", "completion": "..."}
or
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
(at least one assistant message). A template (TOML, one format string with one `{content}` per kind) turns each part
into text; the text before `{content}` is context, `{content}` and the text after it are the part's own:

    prompt = "{content}"                      # context: never a target
    completion = "{content}"                  # trained
    system = "{content}\\n\\n"                  # context
    user = "User: {content}\\n"                # context
    assistant = "Assistant: {content}\\n"      # "Assistant: " is context, the rest is trained

That is the default, `plain` (phi_jax/data/templates/plain.toml), for a base model such as phi-1.5, which knows no
chat format; another template file names its own strings (every key optional; the defaults fill the rest). Each part
is tokenized on its own and the pieces are concatenated, then the end-of-text id closes the example; it is a target
when the example ends with a trained part. The loss mask marks the tokens that are targets: completion and assistant
content, never the prompt.

A bad record (not JSON, not an object, missing or empty fields, an empty completion, an unknown role, no assistant
message) is an error naming file:line; with `skip_bad_lines` it is skipped and counted. The shards store each
example whole (tokens, then one mask byte per token: phi_jax/data/shards.py); the loader packs whole examples into
rows (phi_jax/data/loader.py:SftRows).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from phi_jax.data.corpus import SkipReport
from phi_jax.data.tokenizer import Tokenizer

KINDS = ("prompt", "completion", "system", "user", "assistant")
TRAINED = ("completion", "assistant")  # the kinds whose content (and what follows it) are targets
ROLES = ("system", "user", "assistant")
TEMPLATES_DIR = Path(__file__).with_name("templates")


@dataclasses.dataclass(frozen=True)
class Template:
    """How each part of a record becomes text: a format string with one `{content}` per kind (module docstring)."""

    prompt: str = "{content}"
    completion: str = "{content}"
    system: str = "{content}\n\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    name: str = "plain"

    def __post_init__(self):
        for kind in KINDS:
            fmt = getattr(self, kind)
            if not isinstance(fmt, str) or fmt.count("{content}") != 1:
                raise ValueError(f"Template {self.name!r}: {kind} = {fmt!r} must be a string holding `{{content}}` "
                                 "exactly once.")

    def split(self, kind: str, content: str) -> tuple[str, str]:
        """(context text, own text) of one part: the format's text before `{content}`, then content + the rest."""
        before, after = getattr(self, kind).split("{content}")
        return before, content + after

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> Template:
        """The template of a TOML file (keys of KINDS; the defaults fill the others), or the default for None."""
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"The template {path} does not exist; pass a TOML file with keys {list(KINDS)} "
                                    f"(see {TEMPLATES_DIR / 'plain.toml'}), or no --template for the plain one.")
        data = tomllib.loads(path.read_text())
        if unknown := sorted(set(data) - set(KINDS)):
            raise ValueError(f"The template {path} has unknown keys {unknown}; its keys are {list(KINDS)}.")
        return cls(**data, name=path.stem)

    def identity(self) -> dict:
        return dataclasses.asdict(self)


class BadRecord(ValueError):
    pass


def _text(record: dict, key: str) -> str:
    if key not in record:
        raise BadRecord(f"no field {key!r} (fields: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} is {type(value).__name__}, not a string")
    return value


def parse_record(record) -> list[tuple[str, str]]:
    """A record as its parts [(kind, content), ...]; a BadRecord saying what is wrong otherwise."""
    if not isinstance(record, dict):
        raise BadRecord(f"a JSON {type(record).__name__}, not an object")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise BadRecord("both 'messages' and 'prompt'/'completion': give one form")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRecord("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
        parts = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise BadRecord(f"message {i} is a JSON {type(m).__name__}, not an object")
            role, content = _text(m, "role"), _text(m, "content")
            if role not in ROLES:
                raise BadRecord(f"message {i} has unknown role {role!r} (roles: {list(ROLES)})")
            if role == "assistant" and not content:
                raise BadRecord(f"message {i} is an empty assistant message")
            parts.append((role, content))
        if not any(kind == "assistant" for kind, _ in parts):
            raise BadRecord("no assistant message: nothing to train on")
        return parts
    if "prompt" not in record and "completion" not in record:
        raise BadRecord(f"neither 'messages' nor 'prompt'/'completion' (fields: {sorted(record)})")
    prompt, completion = _text(record, "prompt"), _text(record, "completion")
    if not completion:
        raise BadRecord("empty completion: nothing to train on")
    return [("prompt", prompt), ("completion", completion)]


def sft_documents(paths: str | Iterable[str], report: SkipReport | None = None,
                  skip_bad_lines: bool = False) -> Iterator[str]:
    """Each good record of JSON Lines files, in file then line order, as canonical JSON of its parts (the document
    text prepare_shards hashes and `SftEncoder` tokenizes). A bad record is an error naming file:line, or with
    `skip_bad_lines` skipped and counted in `report` (as bad_lines)."""
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    parts = parse_record(json.loads(raw.decode("utf-8")))
                except ValueError as e:  # BadRecord, JSONDecodeError, UnicodeDecodeError
                    where = f"{path}:{lineno}: {e}"
                    if not skip_bad_lines:
                        raise BadRecord(f"{where}. Fix the record, or pass --skip_bad_lines to skip and count such "
                                        "records.") from None
                    if report is not None:
                        report.add("bad_lines", where)
                    continue
                yield json.dumps({"parts": parts, "where": f"{path}:{lineno}"}, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class SftEncoder:
    """Tokenizes one `sft_documents` document: (token ids with eos appended, loss mask 0/1 per token).

    `max_tokens`: with `strict`, an example of more tokens is an error naming its file:line (the loader would
    truncate it to a row of seq_len + 1 tokens); None checks nothing."""

    template: Template = Template()
    max_tokens: int | None = None
    strict: bool = False

    def __call__(self, tokenizer: Tokenizer, document: str) -> tuple[np.ndarray, np.ndarray]:
        doc = json.loads(document)
        ids, mask = [], []
        for kind, content in doc["parts"]:
            context, own = self.template.split(kind, content)
            for text, trained in ((context, False), (own, kind in TRAINED)):
                if text:
                    piece = tokenizer.encode(text)
                    ids += piece
                    mask += [trained] * len(piece)
        ids.append(tokenizer.eos_id)
        mask.append(doc["parts"][-1][0] in TRAINED)
        if len(ids) < 2:
            raise BadRecord(f"{doc['where']}: the example tokenizes to nothing but the end-of-text id; give it text.")
        if self.strict and self.max_tokens is not None and len(ids) > self.max_tokens:
            raise BadRecord(f"{doc['where']}: the example is {len(ids)} tokens, longer than {self.max_tokens} "
                            f"(seq_len + 1): shorten it, or drop --strict to let training truncate it (counted).")
        return np.asarray(ids, np.int64), np.asarray(mask, np.uint8)

    def identity(self) -> dict:
        return {"kind": "sft", "template": self.template.identity(), "max_tokens": self.max_tokens,
                "strict": self.strict}
