"""phi-1's quality filter: a teacher labels a sample, a random forest learns it on a phi_jax model's embeddings,
and filters the whole corpus.

    # 1. the teacher scores a random sample (exactly-once and resumable like tools.synthesize)
    python -m tools.quality_filter annotate --corpus='web/*.jsonl' --sample_size=100000 --out=qf/labels \\
        --base_url=URL --model=MODEL --concurrency=256
    #    (or bring your own labels: JSONL with "text" and "label" 0/1, or "score" 0-10)
    # 2. embed the labelled documents with a phi_jax model (a workdir, a Hugging Face directory or a Hub id)
    python -m tools.quality_filter embed --labels='qf/labels/labels-*.jsonl' --model=microsoft/phi-1_5 --out=qf/features
    # 3. train the classifier: held-out accuracy and ROC AUC are printed and saved
    python -m tools.quality_filter train --features=qf/features --out=qf/classifier
    # 4. filter the corpus, on N machines: --num_tasks=N --task_index=I (resumable; the last one writes the report)
    python -m tools.quality_filter filter --corpus='web/*.jsonl' --classifier=qf/classifier --out=web_filtered
    python -m tools.prepare_data --source=jsonl --jsonl='web_filtered/kept/*.jsonl' --tokenizer=TOK --out=DATA/web
"""

import argparse
import json
import os
import sys
from pathlib import Path

from tools.synthesize import add_teacher_args, check_teacher_args, retry_policy


def _embedder_args(p: argparse.ArgumentParser, model_required: bool) -> None:
    p.add_argument("--model", required=model_required,
                   help="phi_jax model for the embeddings: a training workdir, a Hugging Face directory or a Hub id"
                   + ("" if model_required else " (default: the one the classifier was trained with)"))
    p.add_argument("--tokenizer", default=None, help="default: the model's own")
    if model_required:  # the filter embeds exactly as the classifier's features were made
        p.add_argument("--max_tokens", type=int, default=512, help="tokens of each document embedded")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch_size", type=int, default=32, help="documents per forward pass (all devices)")
    p.add_argument("--sharding", default="dp", choices=["dp", "fsdp"],
                   help="over several devices: replicate (dp) or shard (fsdp) the parameters")
    p.add_argument("--text_field", default="text")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    a_p = sub.add_parser("annotate", help="the teacher scores a random sample of the corpus")
    a_p.add_argument("--corpus", action="append", required=True, help="JSONL file or pattern (repeatable)")
    a_p.add_argument("--out", required=True)
    a_p.add_argument("--sample_size", type=int, default=100_000, help="documents to score (phi-1: ~100k)")
    a_p.add_argument("--seed", type=int, default=0, help="chooses the sample")
    a_p.add_argument("--text_field", default="text")
    a_p.add_argument("--id_field", default="id")
    a_p.add_argument("--max_chars", type=int, default=6000, help="each document is cut to this many characters")
    a_p.add_argument("--prompt_file", default=None, help="your own prompt with {document} (default: "
                     "phi_jax/datagen/annotate.py's PROMPT)")
    a_p.add_argument("--max_tokens", type=int, default=256)
    a_p.add_argument("--temperature", type=float, default=0.0)
    add_teacher_args(a_p)

    e_p = sub.add_parser("embed", help="features of the labelled documents")
    e_p.add_argument("--labels", action="append", required=True, help="labels JSONL file or pattern (repeatable)")
    e_p.add_argument("--out", required=True)
    e_p.add_argument("--chunk_docs", type=int, default=1024, help="documents per resumable chunk")
    _embedder_args(e_p, model_required=True)

    t_p = sub.add_parser("train", help="fit the classifier; held-out accuracy and ROC AUC")
    t_p.add_argument("--features", required=True)
    t_p.add_argument("--out", required=True)
    t_p.add_argument("--classifier", default="random_forest", choices=["random_forest", "logistic_regression"])
    t_p.add_argument("--label_threshold", type=float, default=5.0, help="a score >= this is high quality")
    t_p.add_argument("--holdout", type=float, default=0.2, help="fraction held out for the metrics")
    t_p.add_argument("--n_estimators", type=int, default=200)
    t_p.add_argument("--seed", type=int, default=0)
    t_p.add_argument("--workers", type=int, default=None, help="scikit-learn jobs (default 1; -1 = all cores)")

    f_p = sub.add_parser("filter", help="score and filter a corpus (resumable, --num_tasks/--task_index)")
    f_p.add_argument("--corpus", action="append", required=True, help="JSONL file or pattern (repeatable)")
    f_p.add_argument("--classifier", required=True, help="the directory python -m tools.quality_filter train wrote")
    f_p.add_argument("--out", required=True)
    f_p.add_argument("--threshold", type=float, default=0.5, help="keep documents whose score is >= this")
    f_p.add_argument("--chunk_docs", type=int, default=1024, help="documents per resumable chunk")
    f_p.add_argument("--id_field", default="id")
    f_p.add_argument("--num_tasks", type=int, default=1)
    f_p.add_argument("--task_index", type=int, default=0)
    f_p.add_argument("--report_only", action="store_true", help="only write report.json and scores.png")
    _embedder_args(f_p, model_required=False)
    a = p.parse_args(argv)

    if a.command == "annotate":
        from phi_jax.datagen.annotate import PROMPT, annotate
        from phi_jax.datagen.runner import Prices

        check_teacher_args(p, a)
        prompt = Path(a.prompt_file).read_text(encoding="utf-8") if a.prompt_file else PROMPT
        s = annotate(a.corpus, a.out, sample_size=a.sample_size, seed=a.seed, base_url=a.base_url, model=a.model,
                     api=a.api, text_field=a.text_field, id_field=a.id_field, max_chars=a.max_chars, prompt=prompt,
                     max_tokens=a.max_tokens, temperature=a.temperature, concurrency=a.concurrency,
                     request_timeout=a.request_timeout, max_failures=a.max_failures, retry=retry_policy(a),
                     prices=Prices(a.price_input_per_mtok, a.price_output_per_mtok), num_tasks=a.num_tasks,
                     task_index=a.task_index, api_key=os.environ.get(a.api_key_env),
                     progress_every=a.progress_every)
        from phi_jax.datagen.runner import format_summary

        print(format_summary(s))
        print(f"  labels: {s['output']['labels']}; unparseable answers (counted, skipped): "
              f"{s['journal_counts']['unparseable']} in {s['output']['unparseable']}")
        if s["stopped"]:
            sys.exit(1)
    elif a.command == "embed":
        from phi_jax.datagen.classifier import embed_labels
        from phi_jax.datagen.embed import Embedder

        embedder = Embedder(a.model, tokenizer=a.tokenizer, max_tokens=a.max_tokens, batch_size=a.batch_size,
                            dtype=a.dtype, sharding=a.sharding)
        s = embed_labels(embedder, a.labels, a.out, chunk_docs=a.chunk_docs, text_field=a.text_field)
        print(f"embedded {s['embedded_now']} documents now, {s['documents']} in all ({s['chunks']} chunks) in "
              f"{a.out}; next: python -m tools.quality_filter train --features={a.out} --out=CLASSIFIER_DIR")
    elif a.command == "train":
        from phi_jax.datagen.classifier import train

        m = train(a.features, a.out, label_threshold=a.label_threshold, holdout=a.holdout, seed=a.seed,
                  kind=a.classifier, n_estimators=a.n_estimators, workers=a.workers)
        auc = "n/a" if m["held_out_roc_auc"] is None else f"{m['held_out_roc_auc']:.4f}"
        print(f"{m['classifier']} on {m['train']} documents ({m['positives']} of {m['documents']} positive): "
              f"held-out accuracy {m['held_out_accuracy']:.4f}, ROC AUC {auc} on {m['held_out']} documents; "
              f"saved in {a.out}")
    else:
        from phi_jax.datagen.embed import Embedder
        from phi_jax.datagen.quality_filter import filter_corpus, write_report

        if a.report_only:
            r = write_report(a.out, a.threshold)
        else:
            def make_embedder(settings: dict) -> Embedder:
                return Embedder(a.model or settings["model"], tokenizer=a.tokenizer, max_tokens=settings["max_tokens"],
                                batch_size=a.batch_size, dtype=settings["dtype"], sharding=a.sharding)

            s = filter_corpus(a.corpus, a.out, a.classifier, threshold=a.threshold, chunk_docs=a.chunk_docs,
                              num_tasks=a.num_tasks, task_index=a.task_index, text_field=a.text_field,
                              id_field=a.id_field, make_embedder=make_embedder)
            print(f"task {a.task_index} of {a.num_tasks}: scored {s['scored_now']} documents now, kept "
                  f"{s['kept_now']}, in {s['seconds']} s")
            r = s["report"]
            if r is None:
                print("other tasks' chunks are not all done yet; the last task to finish writes the report")
                return
        print(f"report: {r['kept']} of {r['documents']} documents kept ({100 * r['keep_rate']:.1f}%) at threshold "
              f"{r['threshold']}; {a.out}/report.json, {a.out}/scores.png")
        print(json.dumps(r["histogram"]["counts"]))


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
