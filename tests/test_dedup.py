"""Deduplication (exact, MinHash) within and across sources, and n-gram decontamination, on constructed corpora
whose duplicates and contaminations are known."""

from __future__ import annotations

import itertools
import json
import random
import string

import pytest
from datagen_helpers import read_jsonl, write_jsonl
from datatrove.data import Document
from datatrove.pipeline.decont.n_grams import NGramsDecontFilter
from runs import documents

from phi_jax.datagen.decontaminate import WhitespaceWordTokenizer, build_index, decont_config, humaneval_items
from phi_jax.datagen.dedup import DedupSource, run

WORDS = ["".join(t) for t in itertools.islice(itertools.product(string.ascii_lowercase, repeat=3), 5000)]


def reformatted(code: str) -> str:
    """The same code with other whitespace: tabs for indents, spaces around every bracket and operator, blank lines."""
    spaced = "".join(f" {c} " if c in "()[]{},:+-*/=<>" else c for c in code)
    return "\n\n".join("\t" + " ".join(line.split()) for line in spaced.splitlines())


@pytest.fixture(scope="module")
def humaneval_filter(tmp_path_factory):
    index = tmp_path_factory.mktemp("index")
    stats = build_index(humaneval_items(), index, decont_config(13))
    assert stats["humaneval"]["items"] == 164
    return NGramsDecontFilter(str(index), config=decont_config(13), language=WhitespaceWordTokenizer())


def caught(f, text: str) -> bool:
    return f.filter(Document(text=text, id="x")) is not True


def test_a_pasted_humaneval_solution_is_caught_however_it_is_spaced(humaneval_filter):
    items = list(humaneval_items())
    long_enough = [i for i in items if len(i.answer.split()) >= 25]
    assert len(long_enough) > 60
    for item in long_enough[::6]:
        page = f"My homework, solved:\n{item.answer}\nThanks for reading."
        assert caught(humaneval_filter, page), item.answer
        assert caught(humaneval_filter, "Look:\n" + reformatted(item.answer) + "\nbye"), reformatted(item.answer)
        assert caught(humaneval_filter, reformatted(item.query) + "\n# (no solution)")  # the prompt alone too
    assert not caught(humaneval_filter, "def add(a, b):\n    return a + b\n")


def test_unrelated_code_is_not_caught(humaneval_filter):
    """60 of the standard library's own files (about 1 MB of Python), none of which holds a HumanEval problem."""
    assert not [i for i, text in enumerate(documents(60)) if caught(humaneval_filter, text)]


def test_dedup_and_decontamination_drop_exactly_the_known_documents(tmp_path):
    """web: 60 distinct documents, 10 exact copies of 7 of them (one group of three), 8 near copies (one word
    changed in 200-300), and 2 exact copies of books' documents; books: 22 distinct documents and one HumanEval
    solution reformatted. Expected: 12 exact (web), 8 near (web), 1 contaminated (books), across sources the web's
    copies go and the books' stay."""
    rng = random.Random(0)
    doc = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 300)))
    base = [doc() for _ in range(60)]
    web = [{"id": f"web{i}", "text": t} for i, t in enumerate(base)]
    web += [{"id": f"copy{j}", "text": base[j % 7]} for j in range(10)]
    for j in range(8):
        words = base[20 + j].split()
        words[len(words) // 2] = "zzzz"
        web.append({"id": f"near{j}", "text": " ".join(words)})
    books = [{"id": f"book{i}", "text": doc(), "author": "x"} for i in range(20)]
    books += [{"id": "book_a", "text": base[40]}, {"id": "book_b", "text": base[41]}]
    problem = next(i for i in humaneval_items() if len(i.answer.split()) >= 25)
    books.append({"id": "contaminated", "text": "Solution:\n" + reformatted(problem.query + problem.answer)})
    write_jsonl(tmp_path / "web" / "a.jsonl", web[:45])
    write_jsonl(tmp_path / "web" / "b.jsonl", web[45:])
    write_jsonl(tmp_path / "books.jsonl", books)
    sources = [DedupSource.parse(f"books={tmp_path / 'books.jsonl'}"), DedupSource.parse(f"web={tmp_path / 'web'}")]
    report = run(sources, tmp_path / "out", benchmark_items=humaneval_items(), tasks=2)
    assert report["sources"] == {
        "books": {"input": 23, "dropped_exact": 0, "dropped_near": 0, "dropped_contaminated": 1, "kept": 22},
        "web": {"input": 78, "dropped_exact": 12, "dropped_near": 8, "dropped_contaminated": 0, "kept": 58}}
    kept = [r for f in sorted((tmp_path / "out" / "output").glob("*/*.jsonl")) for r in read_jsonl(f)]
    assert sorted(p.name for p in (tmp_path / "out" / "output").iterdir()) == ["books", "web"]
    assert all(r["id"].startswith("book") for r in read_jsonl(tmp_path / "out" / "output" / "books" / "00000.jsonl"))
    assert len(kept) == 80 and len({r["text"] for r in kept}) == 80
    assert {"book_a", "book_b"} <= {r["id"] for r in kept} and "contaminated" not in {r["id"] for r in kept}
    assert next(r for r in kept if r["id"] == "book0") == books[0]  # records come out as they went in
    dropped = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "dropped.jsonl")}
    assert dropped["web40"]["duplicate_of"] == "book_a" and dropped["web40"]["duplicate_of_source"] == "books"
    near = [r for r in dropped.values() if r["stage"] == "near"]
    for r in near:  # each near copy goes with the original it was made from, whichever of the two was kept
        j = int(r["id"][4:]) if r["id"].startswith("near") else int(r["duplicate_of"][4:])
        assert {r["id"], r["duplicate_of"]} == {f"near{j}", f"web{20 + j}"}
    assert dropped["contaminated"]["benchmark"] == "humaneval" and len(dropped["contaminated"]["ngram"].split()) == 13
    # run again: every datatrove rank is done, nothing changes
    assert run(sources, tmp_path / "out", benchmark_items=humaneval_items(), tasks=2)["sources"] == report["sources"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["sources"] == report["sources"]
