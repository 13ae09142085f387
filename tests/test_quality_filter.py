"""phi-1's quality filter: the teacher's annotation (against a real server on 127.0.0.1), embeddings from
Phi.hidden_states (checked against a numpy mean of the model's own states, alone or batched, on 1 or 8 devices), the
random forest on a learnable corpus, and the filter in 3 tasks against 1."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from datagen_helpers import labelled_corpus, read_jsonl, tiny_model_dir, write_jsonl
from teacher_server import Server

from phi_jax.datagen.annotate import annotate, parse_score
from phi_jax.datagen.classifier import embed_labels, train
from phi_jax.datagen.embed import Embedder
from phi_jax.datagen.quality_filter import filter_corpus


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("qf"))


@pytest.fixture(scope="module")
def embedder(model_dir):
    return Embedder(str(model_dir), max_tokens=64, batch_size=16, devices=jax.devices()[:1])


@jax.jit
def _states(graphdef, state, tokens):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    h = model.hidden_states(tokens)
    return h, model.lm_head(h, out_dtype=jax.numpy.float32), model(tokens)[0]


def test_hidden_states_are_what_the_lm_head_reads(embedder):
    tokens = np.random.RandomState(0).randint(0, 512, (2, 24))
    h, head_of_h, logits = _states(embedder.graphdef, embedder.state, tokens)
    assert h.shape == (2, 24, 64)
    np.testing.assert_allclose(head_of_h, logits, rtol=1e-5, atol=1e-5)


TEXTS = ["def f(x):\n    return x + 1\n", "a" * 300, "", "import os\nprint(os.getcwd())\n" * 3]


def test_embeddings_are_mean_pooled_real_tokens_whatever_the_batch(embedder):
    got = embedder.embed(TEXTS)
    for text, row in zip(TEXTS, got, strict=True):
        ids = embedder.tokenizer.encode(text)[:64] or [embedder.tokenizer.eos_id]
        h = _states(embedder.graphdef, embedder.state, np.asarray([ids]))[0]  # no padding at all
        np.testing.assert_allclose(row, np.asarray(h[0]).mean(axis=0), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(embedder.embed(TEXTS[:1])[0], got[0], rtol=1e-6, atol=1e-6)  # batch-independent


@pytest.mark.parametrize("devices,sharding", [(8, "dp"), pytest.param(4, "fsdp", marks=pytest.mark.slow)])
def test_embeddings_sharded_over_devices_equal_one_device(embedder, model_dir, devices, sharding):
    sharded = Embedder(str(model_dir), max_tokens=64, batch_size=8, devices=jax.devices()[:devices],
                       sharding=sharding)
    assert sharded.batch_size == 8 and len(sharded.mesh.devices.flat) == devices
    axis = sharded.state["embed_tokens"].get_value().sharding.spec
    assert (axis[1] if len(axis) > 1 else None) == ("fsdp" if sharding == "fsdp" else None)
    np.testing.assert_allclose(sharded.embed(TEXTS), embedder.embed(TEXTS), rtol=1e-5, atol=1e-5)


def test_classifier_learns_a_learnable_label_and_the_filter_splits_into_tasks(embedder, tmp_path):
    """Python functions (1) against word salad (0): held-out accuracy >= 0.95 and ROC AUC >= 0.98 (the classes are
    far apart in any embedding); then the filter in 3 tasks writes the same bytes as in 1."""
    labels = write_jsonl(tmp_path / "labels.jsonl", labelled_corpus(240))
    made = embed_labels(embedder, [str(labels)], tmp_path / "features", chunk_docs=100)
    assert made == {"documents": 240, "embedded_now": 240, "chunks": 3}
    assert embed_labels(embedder, [str(labels)], tmp_path / "features", chunk_docs=100)["embedded_now"] == 0
    metrics = train(tmp_path / "features", tmp_path / "clf", seed=0)
    assert metrics["held_out"] == 48 and metrics["positives"] == 120
    assert metrics["held_out_accuracy"] >= 0.95 and metrics["held_out_roc_auc"] >= 0.98, metrics
    assert json.loads((tmp_path / "clf" / "classifier.json").read_text())["metrics"] == metrics

    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": r["text"], "url": f"u{i}"}
                                                     for i, r in enumerate(labelled_corpus(150, seed=1))])
    make = lambda settings: embedder  # the classifier was trained on this embedder's features
    one = filter_corpus([str(corpus)], tmp_path / "one", tmp_path / "clf", chunk_docs=40, make_embedder=make)
    assert one["chunks"] == 4 and one["report"]["documents"] == 150
    three = [filter_corpus([str(corpus)], tmp_path / "three", tmp_path / "clf", chunk_docs=40, num_tasks=3,
                           task_index=t, make_embedder=make) for t in range(3)]
    assert [t["report"] is None for t in three] == [True, True, False]
    for c in range(4):
        name = f"chunk-{c:05d}"
        assert (tmp_path / "one" / "kept" / f"{name}.jsonl").read_bytes() == \
            (tmp_path / "three" / "kept" / f"{name}.jsonl").read_bytes()
        np.testing.assert_array_equal(np.load(tmp_path / "one" / "scores" / f"{name}.npy"),
                                      np.load(tmp_path / "three" / "scores" / f"{name}.npy"))
    kept = [r for c in range(4) for r in read_jsonl(tmp_path / "one" / "kept" / f"chunk-{c:05d}.jsonl")]
    report = one["report"]
    assert report["kept"] == len(kept) and report["keep_rate"] == pytest.approx(len(kept) / 150)
    assert sum(report["histogram"]["counts"]) == 150
    code = sum("return" in r["text"] for r in kept)
    assert code >= 70 and len(kept) - code <= 5, (code, len(kept))  # 75 are code: the filter keeps them
    assert all(r["quality_score"] >= 0.5 and r["url"].startswith("u") for r in kept)  # the record, plus a score
    assert (tmp_path / "one" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun finds every chunk done: nothing is scored again
    assert filter_corpus([str(corpus)], tmp_path / "one", tmp_path / "clf", chunk_docs=40,
                         make_embedder=make)["scored_now"] == 0


def test_parse_score():
    assert parse_score("Clear and correct.\nScore: 8") == 8.0
    assert parse_score("score = 3 ... final Score: **7**") == 7.0
    assert parse_score("Score: 11") is None and parse_score("I would rather not.") is None


def test_annotation_by_the_teacher_counts_unparseable_answers(tmp_path):
    corpus = write_jsonl(tmp_path / "web.jsonl", labelled_corpus(60))
    with Server() as server:
        s = annotate([str(corpus)], tmp_path / "labels", sample_size=40, seed=1, base_url=server.base_url,
                     model="teacher", concurrency=8)
        again = annotate([str(corpus)], tmp_path / "labels", sample_size=40, seed=1, base_url=server.base_url,
                         model="teacher", concurrency=8)
    labels = read_jsonl(tmp_path / "labels" / "labels-00000-of-00001.jsonl")
    unparseable = read_jsonl(tmp_path / "labels" / "unparseable" / "labels-00000-of-00001.jsonl")
    assert len(labels) + len(unparseable) == 40 and len({r["id"] for r in labels + unparseable}) == 40
    assert s["journal_counts"] == {"labels": len(labels), "unparseable": len(unparseable)} and unparseable
    assert again["completed"] == 0 and again["resumed"] == 40  # exactly once: nothing asked twice
    # the server scores 8 when the document has a return statement, 2 when not
    assert all(r["score"] == (8.0 if "return" in r["text"] else 2.0) for r in labels)
    assert all(r["score"] is None and "rather not" in r["answer"] for r in unparseable)
