"""Tokenizes a document source into train/val ArrayRecord shards for training.

    python -m tools.prepare_data --source=files --glob='~/code/**/*.py' --tokenizer=tok.model --out=data/mycode
    python -m tools.prepare_data --source=jsonl --jsonl=corpus.jsonl --tokenizer=tokenizer.json --out=data/c
    python -m tools.prepare_data --source=tfds --tfds_name=my_ds --tfds_data_dir=~/tfds --tokenizer=t.model --out=d
    python -m tools.prepare_data --source=sft --jsonl=chats.jsonl --tokenizer=phi-1_5/tokenizer.json --out=data/sft

--source=sft reads supervised fine-tuning records ({"prompt", "completion"} or {"messages": [...]}) through a
template (--template=FILE.toml; default: the plain one, phi_jax/data/sft.py) into shards that carry a loss mask
(only completion/assistant tokens are targets); train on them with --config.data.packing=True. With --seq_len and
--strict, an example longer than seq_len + 1 tokens is an error naming file:line (training truncates such examples
and counts them otherwise).

Across machines (a SLURM array, the hosts of a TPU pod; OUT on a filesystem they share), every task reads the same
source and writes its share of the pieces, then one merge writes the metadata:

    python -m tools.prepare_data ... --out=OUT --num_tasks=8 --task_index=$SLURM_ARRAY_TASK_ID
    python -m tools.prepare_data --merge --out=OUT

A killed run resumes where it stopped when run again with the same arguments (finished pieces are kept in
.OUT.partial beside OUT); the shards are the same bytes whichever way they were made. --overwrite replaces only an
empty directory or a previous preparation (the files its metadata.json lists), never other files.
"""

import argparse
import shlex
from pathlib import Path

from phi_jax.data.corpus import SkipReport
from phi_jax.data.prepare import DOCS_PER_SHARD, check_replaceable, merge_shards, prepare_shards
from phi_jax.data.tokenizer import load_tokenizer
from tools._source_args import (
    OneLineParser,
    add_source_args,
    bounded_int,
    check_source_args,
    describe,
    fraction,
    positive_int,
    source_documents,
)


def main(argv=None) -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p, sft=True)
    p.add_argument("--template", default=None, help="--source=sft: a TOML template file (default: plain)")
    p.add_argument("--seq_len", type=positive_int, default=None,
                   help="--source=sft with --strict: refuse examples longer than seq_len + 1 tokens")
    p.add_argument("--tokenizer", help="SentencePiece .model or Hugging Face tokenizer.json")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--val_fraction", type=fraction, default=0.01,
                   help="fraction of documents held out for validation, in [0, 1)")
    p.add_argument("--docs_per_shard", type=positive_int, default=DOCS_PER_SHARD,
                   help="documents per piece of work (= per train shard file)")
    p.add_argument("--workers", type=bounded_int(1, 4096), default=None,
                   help="tokenizer processes (default: all cores)")
    p.add_argument("--num_tasks", type=bounded_int(1, 1_000_000), default=1,
                   help="machines sharing the work (then run --merge)")
    p.add_argument("--task_index", type=int, default=0, help="this machine's task, in [0, num_tasks)")
    p.add_argument("--merge", action="store_true", help="assemble the pieces of all tasks into --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous preparation in --out (never a directory holding other files)")
    a = p.parse_args(argv)
    if not a.out.strip():
        p.error("--out is empty: give the output directory")
    out = Path(a.out).absolute()
    if a.merge:
        meta = merge_shards(out, overwrite=a.overwrite)
    else:
        if not a.tokenizer:
            p.error("--tokenizer is required (except with --merge)")
        if not 0 <= a.task_index < a.num_tasks:
            p.error(f"--task_index={a.task_index} must be in [0, --num_tasks={a.num_tasks})")
        check_source_args(a)
        check_replaceable(out, a.overwrite)  # before the tokenizer is loaded and the source read
        report = SkipReport()
        encode = None
        if a.source == "sft":
            from phi_jax.data.sft import SftEncoder, Template

            if a.seq_len is not None and not a.strict:
                p.error("--seq_len refuses longer examples with --strict only (training truncates them and counts "
                        "them); add --strict or drop --seq_len")

            encode = SftEncoder(Template.load(a.template), None if a.seq_len is None else a.seq_len + 1, a.strict)
        elif a.template or a.seq_len:
            p.error("--template and --seq_len apply to --source=sft only")
        meta = prepare_shards(source_documents(a, report), load_tokenizer(a.tokenizer), out, encode=encode,
                              val_fraction=a.val_fraction, docs_per_shard=a.docs_per_shard, workers=a.workers,
                              overwrite=a.overwrite, source=describe(a), num_tasks=a.num_tasks,
                              task_index=a.task_index, report=report)
        whole = a.num_tasks == 1 or a.source == "sft"  # else this task decoded (and counted) its own pieces only
        print(f"source{'' if whole else f' (task {a.task_index} of {a.num_tasks})'}: {report.summary()}")
        if meta is None:
            print(f"task {a.task_index} of {a.num_tasks} done; when all are, run: python -m tools.prepare_data "
                  f"--merge --out={shlex.quote(a.out)}")
            return
    for split, info in meta["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['tokens']} tokens in {len(info['shards'])} shards")
    print(f"wrote {out}; train with {shlex.quote(f'--config.data.path={out}')}")


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
