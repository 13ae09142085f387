"""SQuAD's exact match (the official v1.1 evaluation script's normalisation), for phi15_squad.yaml."""

import re
import string


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str]) -> float:
    return float(any(normalize(prediction) == normalize(r) for r in references))


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": exact_match(results[0], list(doc["answers"]["text"]))}
