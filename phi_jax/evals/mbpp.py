"""MBPP (Austin et al. 2021): 500 test problems (task ids 11-510), each a sentence and three assert statements.

Zero-shot prompt (the form of bigcode-evaluation-harness's MBPP task): the problem's text and its first test
inside a docstring, then the model writes the function:

    \"\"\"
    Write a function to find the shared elements from the given two lists.
    assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))
    \"\"\"

The program is the completion + the problem's test_setup_code + all its asserts. Data: `DATA_DIR/mbpp.jsonl`
(one record per line: task_id, text, code, test_list, test_setup_code; as Hugging Face's
google-research-datasets/mbpp "full" test split holds them), else that dataset from the Hugging Face cache.
"""

from __future__ import annotations

import json
from pathlib import Path

from phi_jax.evals.code_eval import DataUnavailable, Problem

STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")
HF_DATASET = ("google-research-datasets/mbpp", "full", "test")


def prompt(record: dict) -> str:
    return f'"""\n{record["text"]}\n{record["test_list"][0]}\n"""\n'


def program(record: dict, completion: str) -> str:
    tests = "\n".join(record["test_list"])
    return f"{completion}\n\n{record.get('test_setup_code') or ''}\n{tests}\n"


def read_records(data_dir: str | None) -> list[dict]:
    return read_jsonl_or_hf("mbpp", data_dir, HF_DATASET, required=("task_id", "text", "test_list"))


def problems(data_dir: str | None, limit: int | None = None) -> list[Problem]:
    return [Problem(f"MBPP/{r['task_id']}", prompt(r), STOP, lambda c, r=r: program(r, c))
            for r in read_records(data_dir)[:limit]]


def read_jsonl_or_hf(name: str, data_dir: str | None, hf: tuple[str, str, str], required: tuple[str, ...]
                     ) -> list[dict]:
    """`DATA_DIR/NAME.jsonl` when --data_dir holds it, else the Hugging Face dataset `hf` (path, config, split)
    through its cache (online, or offline with HF_DATASETS_OFFLINE=1). DataUnavailable says what to provide."""
    if data_dir is not None and (Path(data_dir) / f"{name}.jsonl").is_file():
        path = Path(data_dir) / f"{name}.jsonl"
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not JSON ({e}).") from e
        source = str(path)
    else:
        try:
            import datasets

            records = list(datasets.load_dataset(hf[0], hf[1], split=hf[2]))
        except Exception as e:  # offline without a cached copy, no datasets package, no access, ...
            where = f" (no {name}.jsonl in --data_dir={data_dir})" if data_dir else ""
            reason = " ".join(str(e).split())[:200]
            raise DataUnavailable(f"{name} needs its data{where}: pass --data_dir=DIR holding {name}.jsonl, or set "
                                  f"HF_DATASETS_CACHE to a cache holding {hf[0]} or run online "
                                  f"({type(e).__name__}: {reason})") from e
        source = f"{hf[0]}:{hf[1]}:{hf[2]}"
    for n, r in enumerate(records):
        if missing := [k for k in required if k not in r]:
            raise ValueError(f"{source} record {n} lacks {missing} (each record needs {list(required)}).")
    return records
