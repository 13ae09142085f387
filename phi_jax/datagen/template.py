"""Prompt templates for synthetic data: a TOML file with the prompt, its variables and default sampling.

    name = "textbook"
    system = "..."                       # optional system message (chat endpoints)
    prompt = "... {topic} ... {audience} ... {snippet_block} ..."
    snippet_block = "... {snippet} ..."   # optional: put where {snippet_block} is when there are snippets, else ""
    [variables]                          # every combination of these lists is planned for every topic
    audience = ["...", "..."]
    [sampling]                           # defaults for temperature, top_p, max_tokens (flags override them)

Placeholders are Python format fields ({{ and }} are literal braces). Every field must be known: `topic`, a field of
a JSONL topics file, a variable, or `snippet_block`. The shipped templates are in phi_jax/datagen/templates/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
import tomllib
from pathlib import Path

SHIPPED = Path(__file__).parent / "templates"
SAMPLING_KEYS = ("temperature", "top_p", "max_tokens")


def shipped_templates() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    prompt: str
    system: str | None
    snippet_block: str | None
    variables: dict[str, tuple[str, ...]]
    sampling: dict[str, float | int]
    sha256: str  # of the file's bytes: recorded with every record, checked on resume
    path: str

    @property
    def fields(self) -> set[str]:
        return _fields(self.prompt) | (_fields(self.system) if self.system else set())

    def check_fields(self, topic_fields: set[str], with_snippets: bool) -> None:
        """Every placeholder is known, and snippets are used iff the template can place them."""
        known = {"topic", "snippet_block", *topic_fields, *self.variables}
        if unknown := sorted(self.fields - known):
            raise ValueError(f"Template {self.path} uses {unknown}, which is neither topic, a topics-file field "
                             f"({sorted(topic_fields)}), a variable ({sorted(self.variables)}) nor snippet_block: "
                             "add it under [variables] or to the topics file.")
        if with_snippets and (self.snippet_block is None or "snippet_block" not in self.fields):
            raise ValueError(f"--snippets was given but template {self.path} has no snippet_block placed by "
                             "{snippet_block} in its prompt: add both, or drop --snippets.")

    def render(self, values: dict[str, str], snippet: str | None) -> tuple[str | None, str]:
        """(system message, user prompt) with `values` filled in and the snippet block placed (or left out)."""
        block = self.snippet_block.format(snippet=snippet) if snippet is not None and self.snippet_block else ""
        values = {**values, "snippet_block": block}
        system = self.system.format(**values) if self.system else None
        return system, self.prompt.format(**values)


def load_template(name_or_path: str) -> Template:
    """A shipped template by name ("textbook", "exercises") or a TOML file."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        if name_or_path in shipped_templates():
            path = SHIPPED / f"{name_or_path}.toml"
        else:
            raise FileNotFoundError(f"--template={name_or_path} is neither a file nor a shipped template "
                                    f"({', '.join(shipped_templates())}).")
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"Template {path} is not valid TOML: {e}.") from None
    if not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        raise ValueError(f"Template {path} has no prompt = \"...\" string.")
    variables = data.get("variables", {})
    for key, values in variables.items():
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise ValueError(f"Template {path}: variable {key!r} must be a non-empty list of strings, not {values!r}.")
    sampling = data.get("sampling", {})
    if unknown := sorted(set(sampling) - set(SAMPLING_KEYS)):
        raise ValueError(f"Template {path}: [sampling] keys {unknown} are unknown; use {list(SAMPLING_KEYS)}.")
    template = Template(name=str(data.get("name", path.stem)), prompt=data["prompt"], system=data.get("system"),
                        snippet_block=data.get("snippet_block"),
                        variables={k: tuple(v) for k, v in variables.items()}, sampling=dict(sampling),
                        sha256=hashlib.sha256(raw).hexdigest(), path=str(path))
    for text in (template.prompt, template.system or "", template.snippet_block or ""):
        try:
            _fields(text)
        except ValueError as e:  # an unmatched brace
            raise ValueError(f"Template {path}: {e} in {text[:60]!r}...; write literal braces as {{{{ and }}}}.") \
                from None
    if template.snippet_block is not None and _fields(template.snippet_block) != {"snippet"}:
        raise ValueError(f"Template {path}: snippet_block must use exactly the field {{snippet}}.")
    return template
