"""Weighted mixtures of shard directories: proportions, exact resume, per-source metrics and clear errors."""

import numpy as np
import pytest

from phi_jax.data.loader import KEYS, Windows, make_mixture_dataset
from phi_jax.data.mixture import Interleave, integer_proportions, parse_paths, parse_weights
from phi_jax.data.prepare import prepare_shards
from phi_jax.data.shards import SplitReader
from phi_jax.data.training_data import resolve_data
from phi_jax.run_config import base_config


class CharTokenizer:
    """One id per character (ord % 200 + 1), eos 0; `tag` changes its identity (a different tokenizer)."""

    def __init__(self, path, tag="char"):
        self.path, self.tag = path, tag
        if not path.exists():
            path.write_text(tag)
        self.tag = path.read_text()
        self.vocab_size, self.eos_id, self.bos_id = 201, 0, None

    def identity(self):
        return {"kind": "char", "path": self.path.name, "sha256": self.tag, "vocab_size": self.vocab_size}

    def encode(self, text):
        return [ord(c) % 200 + 1 for c in text]


A, B = ord("a") % 200 + 1, ord("b") % 200 + 1


def _source(root, letter, n_docs, tag="char"):
    """Documents of one repeated letter (its id marks the source) with a numbered suffix (tells windows apart)."""
    tok = CharTokenizer(root / f"{letter}-{tag}.tok", tag)
    docs = [letter * (5 + i % 7) + chr(ord("0") + i % 10) for i in range(n_docs)]
    prepare_shards(docs, tok, root / letter, val_fraction=0.2, workers=1, source=letter)
    return root / letter


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return _source(root, "a", 300), _source(root, "b", 60)


def _source_of(inputs):
    """0 for an example from source a, 1 for b (each example's tokens come from one source only)."""
    has_a, has_b = (inputs == A).any(-1), (inputs == B).any(-1)
    assert not (has_a & has_b).any() and (has_a | has_b).all()
    return has_b.astype(int)


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("weights", [[0.8, 0.2]])  # other weights: test_weights_parse_to_exact_integer_proportions
def test_realized_proportions_within_one_percent(sources, weights):
    bs, steps = 100, 100  # 10k examples
    got = _take(make_mixture_dataset(list(sources), weights, seq_len=8, global_batch_size=bs, seed=0), steps)
    src = np.concatenate([_source_of(b["inputs"]) for b in got])
    share_b = src.mean()
    assert abs(share_b - weights[1] / sum(weights)) <= 0.01, share_b
    # The counts the metrics report are the ones the loader realized, at every step.
    inter = Interleave(integer_proportions(weights))
    for k in (1, 7, 100, 2345, 10_000):
        assert inter.counts(k) == [int((src[:k] == 0).sum()), int((src[:k] == 1).sum())]


def test_each_source_is_shuffled_and_covered_once_per_epoch(sources):
    got = _take(make_mixture_dataset(list(sources), [0.5, 0.5], seq_len=8, global_batch_size=10, seed=1), 60)
    inputs = np.concatenate([b["inputs"] for b in got])
    rows_b = [r.tobytes() for r in inputs[_source_of(inputs) == 1]]
    windows = Windows(SplitReader(sources[1], "train"), 8)
    windows_b = sorted(windows[i]["inputs"].tobytes() for i in range(len(windows)))
    n = len(windows_b)
    assert len(rows_b) >= 2 * n
    assert sorted(rows_b[:n]) == sorted(rows_b[n:2 * n]) == windows_b  # each epoch of b: every window exactly once
    assert rows_b[:n] != rows_b[n:2 * n]  # a fresh permutation each epoch


@pytest.mark.parametrize("packing", [False, True])
def test_resume_in_the_middle_of_a_mixture_is_bitwise(sources, packing):
    kw = dict(seq_len=8, global_batch_size=6, seed=3, packing=packing)
    it = iter(make_mixture_dataset(list(sources), [0.8, 0.2], **kw))
    for _ in range(7):
        next(it)
    state = it.get_state()
    assert state == {"next_index": 7}  # the position is one integer: the step
    expected = [next(it) for _ in range(5)]
    resumed = iter(make_mixture_dataset(list(sources), [0.8, 0.2], **kw))
    resumed.set_state(state)
    for e in expected:
        got = next(resumed)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], e[k])


def test_processes_split_the_global_batch(sources):
    kw = dict(seq_len=8, global_batch_size=6, seed=2)
    whole = _take(make_mixture_dataset(list(sources), [0.8, 0.2], **kw), 5)
    parts = [_take(make_mixture_dataset(list(sources), [0.8, 0.2], process_index=p, process_count=3, **kw), 5)
             for p in range(3)]
    for step in range(5):
        for p in range(3):
            np.testing.assert_array_equal(parts[p][step]["inputs"], whole[step]["inputs"][p::3])


@pytest.fixture(autouse=True)
def char_tokenizers(monkeypatch):
    """resolve_data loads the tokenizer copy in the shards: read it back as a CharTokenizer."""
    import phi_jax.data.training_data as training_data

    monkeypatch.setattr(training_data, "load_tokenizer", CharTokenizer)


def _config(path, weights="", seq_len=8):
    c = base_config()
    c.seq_len = seq_len
    c.data.path, c.data.mixture_weights = path, weights
    return c


def test_resolve_mixture_and_its_metrics(sources):
    spec = resolve_data(_config(f"{sources[0]},{sources[1]}", "0.8,0.2"))
    assert spec.is_mixture and spec.names == ["a", "b"] and spec.weights == (0.8, 0.2)
    assert [m["source"] for m in spec.identity()["mixture"]] == ["a", "b"]
    assert spec.tokens_seen(10, seq_len=8) == {"tokens/a": 64, "tokens/b": 16}
    assert spec.val_metrics({"a": 1.0, "b": 2.0}) == {"val_loss": pytest.approx(1.2), "val_loss/a": 1.0,
                                                      "val_loss/b": 2.0}
    evals = spec.eval_batches(seq_len=8, batch_size=2, max_batches=2)
    assert sorted(evals) == ["a", "b"] and all(len(v) == 2 for v in evals.values())
    assert (evals["b"][0]["inputs"] == B).any() and not (evals["b"][0]["inputs"] == A).any()
    c = _config(f"{sources[0]},{sources[1]}", "0.8,0.2")
    c.batch_size = 4
    b = next(iter(spec.train_dataset(c)))
    assert b["inputs"].shape == (4, 8)
    single = resolve_data(_config(str(sources[0])))
    assert not single.is_mixture and single.tokens_seen(10, 8) == {}


@pytest.mark.parametrize("weights,match", [
    ("0.8,0", "must be a finite number > 0"),
    ("0.8,-0.2", "must be a finite number > 0"),
    ("0.8,nan", "must be a finite number > 0"),
    ("0.8,x", "'x' .* is not a number"),
    ("0.8", "names 2 directories but .* gives 1 weights"),
])
def test_bad_weights_are_clear_errors(sources, weights, match):
    with pytest.raises(ValueError, match=match):
        resolve_data(_config(f"{sources[0]},{sources[1]}", weights))


def test_mixture_config_errors(sources, tmp_path):
    with pytest.raises(ValueError, match=r"give their shares with --config\.data\.mixture_weights"):
        resolve_data(_config(f"{sources[0]},{sources[1]}"))
    with pytest.raises(ValueError, match="give their shard directories"):
        resolve_data(_config("", "0.8,0.2"))
    with pytest.raises(ValueError, match="names a directory twice"):
        parse_paths(f"{sources[0]},{sources[0]}")
    with pytest.raises(ValueError, match="empty entry"):
        parse_paths(f"{sources[0]},")


def test_mismatched_tokenizer_is_an_error(sources, tmp_path):
    other = _source(tmp_path, "b", 60, tag="other")
    with pytest.raises(ValueError, match=r"different tokenizers: .*/a with a-char.tok .*/b with b-other.tok"):
        resolve_data(_config(f"{sources[0]},{other}", "0.8,0.2"))


def test_empty_or_tiny_source_is_an_error(sources, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no token shards"):
        resolve_data(_config(f"{sources[0]},{tmp_path / 'empty'}", "0.8,0.2"))
    tiny = _source(tmp_path, "t", 3)
    with pytest.raises(ValueError, match=r"train split of .*/t has \d+ tokens, too few"):
        resolve_data(_config(f"{sources[0]},{tiny}", "0.8,0.2", seq_len=64))
    with pytest.raises(ValueError, match=r"train split of .*/t has \d+ tokens: 0 windows"):
        make_mixture_dataset([sources[0], tiny], [0.8, 0.2], seq_len=64, global_batch_size=2, seed=0)


def test_weights_parse_to_exact_integer_proportions():
    assert parse_weights("0.8, 0.2") == [0.8, 0.2]
    assert integer_proportions([0.8, 0.2]) == (4, 1)
    assert integer_proportions([1, 1, 2]) == (1, 1, 2)
    assert integer_proportions([0.15, 0.05, 0.8]) == (3, 1, 16)
    inter = Interleave((4, 1))
    assert [inter[i] for i in range(10)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0),
                                             (0, 4), (0, 5), (0, 6), (0, 7), (1, 1)]
    three = Interleave((3, 1, 16))  # every prefix stays within two examples of each source's share
    counts = np.array([three.counts(k) for k in range(3000)])
    assert np.abs(counts - np.arange(3000)[:, None] * np.array([3, 1, 16]) / 20).max() < 2
    assert (counts.sum(1) == np.arange(3000)).all()


def test_training_on_a_mixture_reports_each_source(tmp_path):
    """The real entry point: tokens seen and validation loss per source in metrics.jsonl."""
    from runs import TINY_RUN, documents, metrics, run_cli

    from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece

    docs = documents(30)
    tok = load_tokenizer(train_sentencepiece(docs, tmp_path / "sp", vocab_size=512))
    for name, part in (("code", docs[:20]), ("more", docs[20:])):
        prepare_shards(part, tok, tmp_path / name, val_fraction=0.2, workers=1)
    result = run_cli(tmp_path / "run", f"--config.data.path={tmp_path / 'code'},{tmp_path / 'more'}",
                     "--config.data.mixture_weights=3,1", *TINY_RUN, "--config.total_steps=2",
                     "--config.eval_every=2", "--config.eval_batches=1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    step2 = {k: v for r in rows if r["step"] == 2 for k, v in r.items()}
    assert step2["tokens/code"] == 12 * 32 and step2["tokens/more"] == 4 * 32  # 2 steps x 8 sequences x 32 tokens
    assert step2["val_loss"] == pytest.approx(0.75 * step2["val_loss/code"] + 0.25 * step2["val_loss/more"])
    assert "val_loss/code" in rows[0] and "val_loss/more" in rows[0]  # step 0, before training
    events = b"".join(p.read_bytes() for p in (tmp_path / "run" / "tensorboard").glob("events.*"))
    assert all(tag in events for tag in (b"tokens/code", b"tokens/more", b"val_loss/code", b"val_loss/more"))


def test_phi15_config_mixes_80_20_with_paths_as_overrides(sources):
    from configs.phi15 import get_config

    c = get_config()
    assert c.data.mixture_weights == "0.8,0.2" and c.data.path == ""
    with pytest.raises(ValueError, match="mixes 2 sources: give their shard directories"):
        resolve_data(c)
    c.seq_len, c.data.path = 8, f"{sources[0]},{sources[1]}"  # --config.data.path=TEXTBOOKS,PHI1_DATA
    spec = resolve_data(c)
    assert spec.weights == (0.8, 0.2) and spec.names == ["a", "b"]
