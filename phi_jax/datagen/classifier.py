"""phi-1's quality classifier: features of labelled documents, then a random forest (Gunasekar et al. 2023, 2.1).

`embed_labels` turns labels (the annotator's, or a user's JSONL with "text" and "label" 0/1 or "score") into
feature chunks, resumably: FEATURES/chunk-CCCCC.npz (ids, features, scores, labels) and FEATURES/embedder.json.
`train` reads them, holds out a stratified fraction, fits scikit-learn's RandomForestClassifier (phi-1's choice;
logistic regression as an alternative), prints and saves held-out accuracy and ROC AUC, and writes
OUT/classifier.joblib with OUT/classifier.json (the embedder's settings, which the filter reuses, and the metrics).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from phi_jax.datagen.documents import read_documents
from phi_jax.datagen.journal import write_json

log = logging.getLogger("phi_jax")

CLASSIFIERS = ("random_forest", "logistic_regression")


def _label_fields(record: dict, where: str) -> tuple[float, int]:
    """(score or nan, label 0/1 or -1) of a labels record."""
    score, label = record.get("score"), record.get("label")
    if label is not None:
        if label not in (0, 1, True, False):
            raise ValueError(f"{where}: label {label!r} must be 0 or 1.")
        return float("nan") if score is None else float(score), int(label)
    if score is None or not isinstance(score, int | float):
        raise ValueError(f"{where}: a labels record needs \"label\" (0/1) or a numeric \"score\"; got "
                         f"{sorted(record)}.")
    return float(score), -1


def embed_labels(embedder, labels, out: str | Path, *, chunk_docs: int = 1024, text_field: str = "text") -> dict:
    """Features of every labelled document, in chunks; finished chunks of an earlier run are kept."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = embedder.describe()
    meta_path = out / "embedder.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) != settings:
        raise ValueError(f"{out} holds features made with other settings ({meta_path}); use a new --out.")
    write_json(meta_path, settings)
    docs = list(read_documents(labels, text_field, flag="--labels"))
    made = 0
    for c, start in enumerate(range(0, len(docs), chunk_docs)):
        path = out / f"chunk-{c:05d}.npz"
        if path.exists():
            continue
        part = docs[start:start + chunk_docs]
        fields = [_label_fields(r, f"--labels document {d}") for d, _, r in part]
        features = embedder.embed([t for _, t, _ in part])
        tmp = out / f".chunk-{c:05d}.tmp.npz"
        np.savez(tmp, ids=np.array([d for d, _, _ in part]), features=features,
                 scores=np.array([s for s, _ in fields], np.float32), labels=np.array([lab for _, lab in fields],
                                                                                       np.int8))
        os.replace(tmp, path)
        made += len(part)
    return {"documents": len(docs), "embedded_now": made, "chunks": -(-len(docs) // chunk_docs)}


def load_features(features: str | Path, label_threshold: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """(X, y, embedder settings): labels as given, else score >= label_threshold."""
    features = Path(features)
    chunks = sorted(features.glob("chunk-*.npz"))
    if not chunks:
        raise FileNotFoundError(f"No chunk-*.npz in {features}: run python -m tools.quality_filter embed first.")
    xs, ys = [], []
    for path in chunks:
        with np.load(path) as z:
            labels, scores = z["labels"], z["scores"]
            ys.append(np.where(labels >= 0, labels, scores >= label_threshold).astype(np.int8))
            xs.append(z["features"])
    return np.concatenate(xs), np.concatenate(ys), json.loads((features / "embedder.json").read_text())


def make_classifier(kind: str, seed: int, n_estimators: int = 200, workers: int | None = None):
    if kind == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=workers)
    if kind == "logistic_regression":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    raise ValueError(f"--classifier={kind} must be one of {CLASSIFIERS}.")


def train(features: str | Path, out: str | Path, *, label_threshold: float = 5.0, holdout: float = 0.2,
          seed: int = 0, kind: str = "random_forest", n_estimators: int = 200, workers: int | None = None) -> dict:
    """Fits the classifier on (1 - holdout) of the labelled features; returns (and saves) the held-out metrics."""
    import joblib
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import train_test_split

    if not 0.0 < holdout < 1.0:
        raise ValueError(f"--holdout={holdout} must be in (0, 1).")
    x, y, embedder = load_features(features, label_threshold)
    positives = int(y.sum())
    if positives == 0 or positives == len(y):
        raise ValueError(f"All {len(y)} labelled documents are in one class ({positives} positive at "
                         f"--label_threshold={label_threshold}); a classifier needs both.")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=holdout, random_state=seed, stratify=y)
    clf = make_classifier(kind, seed, n_estimators, workers)
    clf.fit(x_train, y_train)
    proba = clf.predict_proba(x_test)[:, 1]
    metrics = {"classifier": kind, "documents": len(y), "positives": positives, "train": len(y_train),
               "held_out": len(y_test), "label_threshold": label_threshold, "seed": seed,
               "held_out_accuracy": float(accuracy_score(y_test, proba >= 0.5)),
               "held_out_roc_auc": float(roc_auc_score(y_test, proba)) if len(set(y_test)) == 2 else None}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".classifier.joblib.tmp"
    joblib.dump(clf, tmp)
    os.replace(tmp, out / "classifier.joblib")
    write_json(out / "classifier.json", {"embedder": embedder, "metrics": metrics})
    return metrics


def load_classifier(directory: str | Path):
    """(classifier, its classifier.json) from a `train` output directory."""
    import joblib

    directory = Path(directory)
    if not (directory / "classifier.joblib").is_file():
        raise FileNotFoundError(f"No classifier.joblib in {directory}: run python -m tools.quality_filter train.")
    return joblib.load(directory / "classifier.joblib"), json.loads((directory / "classifier.json").read_text())
