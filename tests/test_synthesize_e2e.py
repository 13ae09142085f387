"""README's "Making the data" end to end on this machine: synthesize textbooks against a real local teacher, filter a
web corpus with the quality classifier, deduplicate and decontaminate both, prepare shards (tools.prepare_data
reading the outputs by pattern) and train the tiny model 20 steps on phi-1.5-web's 0.4 / 0.2 / 0.4 mixture."""

from __future__ import annotations

import json
import subprocess
import sys

from datagen_helpers import labelled_corpus, read_jsonl, tiny_model_dir, write_jsonl
from runs import ROOT, TINY_RUN, clean_env, documents, losses
from teacher_server import Server

from phi_jax.data.prepare import prepare_shards
from phi_jax.data.tokenizer import load_tokenizer
from phi_jax.datagen.classifier import embed_labels, train
from phi_jax.datagen.decontaminate import humaneval_items
from phi_jax.datagen.dedup import DedupSource, run
from phi_jax.datagen.embed import Embedder
from phi_jax.datagen.plan import Plan
from phi_jax.datagen.quality_filter import filter_corpus
from phi_jax.datagen.synthesize import synthesize
from phi_jax.datagen.template import load_template


def test_topics_to_a_trained_mixture(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    topics = [{"topic": f"lesson {i}"} for i in range(6)]
    with Server() as server:
        s = synthesize(Plan(load_template("textbook"), topics), tmp_path / "textbooks", base_url=server.base_url,
                       model="teacher", sampling={"max_tokens": 400}, concurrency=16)
    assert s["completed"] == 72 and s["streams"] == {"complete": 72, "incomplete": 0}

    embedder = Embedder(str(model_dir), max_tokens=64, batch_size=16)
    embed_labels(embedder, [str(write_jsonl(tmp_path / "labels.jsonl", labelled_corpus(160, seed=2)))],
                 tmp_path / "features")
    assert train(tmp_path / "features", tmp_path / "clf")["held_out_accuracy"] >= 0.9
    web = write_jsonl(tmp_path / "web.jsonl", [{"text": r["text"]} for r in labelled_corpus(120, seed=3)])
    report = filter_corpus([str(web)], tmp_path / "web_filtered", tmp_path / "clf", chunk_docs=50,
                           make_embedder=lambda settings: embedder)["report"]
    assert 50 <= report["kept"] <= 70  # the 60 code documents

    clean = run([DedupSource.parse(f"textbooks={tmp_path / 'textbooks'}/part-*.jsonl"),
                 DedupSource.parse(f"web={tmp_path / 'web_filtered' / 'kept'}")], tmp_path / "clean",
                benchmark_items=humaneval_items())
    assert clean["sources"]["textbooks"]["kept"] == 72 and clean["sources"]["web"]["input"] == report["kept"]

    tokenizer = model_dir / "tokenizer.model"
    prepared = subprocess.run([sys.executable, "-m", "tools.prepare_data", "--source=jsonl",
                               f"--jsonl={tmp_path / 'clean' / 'output' / 'textbooks'}/*.jsonl",
                               f"--tokenizer={tokenizer}", f"--out={tmp_path / 'data' / 'textbooks'}",
                               "--val_fraction=0.1", "--workers=1"],
                              cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    splits = json.loads((tmp_path / "data" / "textbooks" / "metadata.json").read_text())["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 72
    web_docs = [r["text"] for f in sorted((tmp_path / "clean" / "output" / "web").glob("*.jsonl"))
                for r in read_jsonl(f)]
    tok = load_tokenizer(tokenizer)
    prepare_shards(web_docs, tok, tmp_path / "data" / "web", val_fraction=0.1, workers=1)
    prepare_shards(documents(10), tok, tmp_path / "data" / "code", val_fraction=0.1, workers=1)

    data = ",".join(str(tmp_path / "data" / n) for n in ("web", "code", "textbooks"))
    result = subprocess.run([sys.executable, "-m", "phi_jax.train", "--config=configs/quickstart.py",
                             f"--workdir={tmp_path / 'run'}", f"--config.data.path={data}",
                             "--config.data.mixture_weights=0.4,0.2,0.4", *TINY_RUN, "--config.total_steps=20",
                             "--config.checkpoint_every=20"],
                            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loss = losses(tmp_path / "run")
    assert sorted(loss) == list(range(1, 21)) and loss[20] < loss[1]


def test_phi15_web_config_is_phi15_with_the_web_mixture():
    from configs.phi15 import get_config as phi15
    from configs.phi15_web import get_config
    from phi_jax.data.mixture import integer_proportions, parse_weights

    c, base = get_config(), phi15()
    assert c.data.mixture_weights == "0.4,0.2,0.4" and integer_proportions(parse_weights(c.data.mixture_weights)) \
        == (2, 1, 2)
    base.data.mixture_weights = c.data.mixture_weights
    assert c.to_dict() == base.to_dict()  # the recipe is phi-1.5's; only the mixture differs
