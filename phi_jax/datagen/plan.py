"""The plan of a synthetic-data run: topics x variable combinations x samples, each item with a deterministic id.

Item k of the plan (topics in file order, then variable combinations in the template's order, then sample index)
goes to task k % num_tasks. Its id is a hash of (topic fields, variables, sample index, seed): the same item has the
same id on every machine and every resume, which is what makes the output exactly-once. With snippets, the item's
snippet is chosen by a hash of its id, so it is also fixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from phi_jax.datagen.documents import jsonl_records
from phi_jax.datagen.template import Template


def stable_hash(obj) -> str:
    """A 16-hex-digit digest of a JSON-able value (keys sorted): the same on every machine and Python version."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def read_topics(path: str | Path) -> list[dict[str, str]]:
    """One topic per line (blank lines and lines starting with # skipped), or JSONL objects with a "topic" field
    whose other string fields become template fields."""
    topics, path = [], Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--topics={path} does not exist.")
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e}); a topics file holds one topic per line or one "
                                 "JSON object per line.") from None
            if not isinstance(record.get("topic"), str) or not all(isinstance(v, str) for v in record.values()):
                raise ValueError(f"{path}:{lineno}: a JSONL topic needs a string field \"topic\" and string values, "
                                 f"got {sorted(record)}.")
            topics.append(record)
        else:
            topics.append({"topic": line})
    if not topics:
        raise ValueError(f"--topics={path} holds no topic.")
    fields = set(topics[0])
    for i, t in enumerate(topics):
        if set(t) != fields:
            raise ValueError(f"{path}: topic {i} has fields {sorted(t)}, the first {sorted(fields)}: every topic "
                             "must have the same fields.")
    return topics


@dataclasses.dataclass(frozen=True)
class Snippets:
    """Web samples for diversity (JSONL with a text field and an optional id field), one chosen per item."""

    texts: list[str]
    ids: list[str]
    max_chars: int

    @classmethod
    def read(cls, path: str | Path, text_field: str = "text", id_field: str = "id", max_chars: int = 1000
             ) -> Snippets:
        texts, ids = [], []
        for lineno, record, text in jsonl_records(path, text_field, "pass --snippet_text_field"):
            texts.append(text)
            ids.append(str(record.get(id_field, f"{Path(path).name}:{lineno}")))
        if not texts:
            raise ValueError(f"--snippets={path} holds no sample.")
        return cls(texts, ids, max_chars)

    def pick(self, item_id: str) -> tuple[str, str]:
        """(snippet id, text cut to max_chars) for an item: a hash of its id picks the sample."""
        i = int(item_id, 16) % len(self.texts)
        return self.ids[i], self.texts[i][:self.max_chars]


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    topic: dict[str, str]
    variables: dict[str, str]
    sample: int
    snippet_id: str | None
    system: str | None
    prompt: str


@dataclasses.dataclass(frozen=True)
class Plan:
    template: Template
    topics: list[dict[str, str]]
    samples: int = 1
    seed: int = 0
    snippets: Snippets | None = None
    num_tasks: int = 1
    task_index: int = 0

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError(f"--samples={self.samples} must be >= 1.")
        if not 0 <= self.task_index < self.num_tasks:
            raise ValueError(f"--task_index={self.task_index} must be in [0, --num_tasks={self.num_tasks}).")
        self.template.check_fields(set(self.topics[0]) - {"topic"}, self.snippets is not None)

    @property
    def combinations(self) -> list[dict[str, str]]:
        names = list(self.template.variables)
        return [dict(zip(names, values, strict=True))
                for values in itertools.product(*(self.template.variables[n] for n in names))]

    @property
    def size(self) -> int:
        """Items in the whole plan (all tasks)."""
        return len(self.topics) * len(self.combinations) * self.samples

    @property
    def task_size(self) -> int:
        return len(range(self.task_index, self.size, self.num_tasks))

    def _keys(self) -> Iterator[tuple[dict[str, str], dict[str, str], int]]:
        combos = self.combinations
        k = 0
        for topic in self.topics:
            for variables in combos:
                for sample in range(self.samples):
                    if k % self.num_tasks == self.task_index:
                        yield topic, variables, sample
                    k += 1

    def item_id(self, topic: dict[str, str], variables: dict[str, str], sample: int) -> str:
        return stable_hash({"topic": topic, "variables": variables, "sample": sample, "seed": self.seed})

    def item_ids(self) -> Iterator[str]:
        """This task's item ids in plan order (without rendering the prompts)."""
        for key in self._keys():
            yield self.item_id(*key)

    def items(self) -> Iterator[Item]:
        """This task's items, rendered, in plan order."""
        for key in self._keys():
            yield self.item(*key)

    def item(self, topic: dict[str, str], variables: dict[str, str], sample: int) -> Item:
        item_id = self.item_id(topic, variables, sample)
        snippet_id, snippet = self.snippets.pick(item_id) if self.snippets else (None, None)
        system, prompt = self.template.render({**topic, **variables}, snippet)
        return Item(item_id, topic, variables, sample, snippet_id, system, prompt)

    def describe(self) -> dict:
        """What the plan is made of (recorded in the output directory; a resume must match it)."""
        return {"template": self.template.name, "template_sha256": self.template.sha256,
                "topics": len(self.topics), "topics_sha256": stable_hash(self.topics),
                "variables": {k: list(v) for k, v in self.template.variables.items()}, "samples": self.samples,
                "seed": self.seed, "snippets": len(self.snippets.texts) if self.snippets else 0,
                "snippets_sha256": stable_hash([self.snippets.max_chars, self.snippets.ids, self.snippets.texts])
                if self.snippets else None,
                "num_tasks": self.num_tasks, "items": self.size}
