"""Token shards, the grain loader, the default corpus and resolve_data."""

import itertools
import json

import grain
import numpy as np
import pytest

from phi_jax.data import default as default_mod
from phi_jax.data import loader as loader_mod
from phi_jax.data.corpus import SkipReport, file_documents, jsonl_documents, stdlib_documents, tfds_documents
from phi_jax.data.loader import KEYS, PackedRows, make_dataset, make_eval_batches, pack_plan
from phi_jax.data.prepare import merge_shards, prepare_shards
from phi_jax.data.shards import SplitReader, check_compatible, is_val, read_metadata
from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from phi_jax.data.training_data import resolve_data
from phi_jax.run_config import base_config


class CharTokenizer:
    """One id per character (ord % 200 + 1), eos 0: lengths are easy to predict by hand."""

    def __init__(self, path, vocab_size=201):
        self.path = path
        self.path.write_text(f"chars {vocab_size}")
        self.vocab_size, self.eos_id, self.bos_id = vocab_size, 0, None

    def identity(self):
        return {"kind": "char", "path": self.path.name, "sha256": f"char{self.vocab_size}", "vocab_size": 201}

    def encode(self, text):
        return [ord(c) % 200 + 1 for c in text]

    def decode(self, ids):
        raise NotImplementedError


DOCS = [f"def f{i}():\n    return {'x' * (i % 13)} + {i}\n" * (1 + i % 5) for i in range(80)] + ["", "é 日本\n"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = list(itertools.islice(stdlib_documents(), 5)) + DOCS
    return load_tokenizer(train_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "sp", 400))


@pytest.fixture(scope="module")
def data_dir(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "d"
    prepare_shards(DOCS, tok, out, val_fraction=0.1, docs_per_shard=30, workers=1, source="test docs")
    return out


def encoded(tok, split):
    return [[*tok.encode(d), tok.eos_id] for i, d in enumerate(DOCS) if is_val(i, 0.1) == (split == "val")]


def flat(lists):
    return list(itertools.chain.from_iterable(lists))


def batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_shards_round_trip(tok, data_dir):
    for split in ("train", "val"):
        reader = SplitReader(data_dir, split)
        expected = encoded(tok, split)
        assert [reader.document(i).tolist() for i in range(len(reader))] == expected
        assert reader.tokens(0, reader.num_tokens).tolist() == flat(expected)


def test_metadata(tok, data_dir):
    meta = read_metadata(data_dir)
    train, val = encoded(tok, "train"), encoded(tok, "val")
    assert meta["format_version"] == 2 and meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    assert meta["tokenizer"] == tok.identity() and meta["source"] == "test docs"
    assert meta["splits"]["train"]["documents"] == len(train) and meta["splits"]["val"]["documents"] == len(val) == 9
    assert meta["splits"]["train"]["tokens"] == sum(map(len, train))
    assert meta["max_token_id"] == max(max(d) for d in train + val)
    assert len(meta["splits"]["train"]["shards"]) == 3  # 82 docs / 30
    pieces = [range(p * 30, min(len(DOCS), p * 30 + 30)) for p in range(3)]  # shard p: documents of piece p
    # The pieces' validation documents (3 + 3 + 3) gathered into files of up to 30: one file, not one per piece.
    assert [s["records"] for s in meta["splits"]["val"]["shards"]] == [9]
    assert [s["records"] for s in meta["splits"]["train"]["shards"]] == [sum(not is_val(i, 0.1) for i in r)
                                                                         for r in pieces]
    assert (data_dir / meta["tokenizer_file"]).read_bytes() == tok.path.read_bytes()


def test_prepare_is_deterministic_with_workers(tok, data_dir, tmp_path):
    prepare_shards(DOCS, tok, tmp_path / "d", val_fraction=0.1, docs_per_shard=30, workers=2, source="test docs")
    for f in sorted(data_dir.iterdir()):
        assert (tmp_path / "d" / f.name).read_bytes() == f.read_bytes(), f.name


def test_prepare_refuses_to_overwrite(tok, data_dir, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_shards(DOCS[:3], tok, data_dir, workers=1)
    out = tmp_path / "d"
    prepare_shards(DOCS[:3], tok, out, val_fraction=0, workers=1)
    prepare_shards(DOCS[:5], tok, out, val_fraction=0, overwrite=True, workers=1)
    assert read_metadata(out)["splits"]["train"]["documents"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary directories left behind


def test_token_id_beyond_vocab_is_an_error(tmp_path):
    liar = CharTokenizer(tmp_path / "chars.txt", vocab_size=50)
    with pytest.raises(ValueError, match="outside the tokenizer's vocab_size 50"):
        prepare_shards(["zzz"], liar, tmp_path / "d", workers=1)
    assert not (tmp_path / "d").exists()


def test_windows_match_reference_slicing(tok, data_dir):
    stream = np.asarray(flat(encoded(tok, "train")))
    seq_len, bs = 16, 4
    got = batches(make_dataset(data_dir, seq_len=seq_len, global_batch_size=bs, seed=0, shuffle=False), 3)
    for step, b in enumerate(got):
        assert {k: v.shape for k, v in b.items()} == {k: (bs, seq_len) for k in KEYS}
        for row in range(bs):
            w = stream[(step * bs + row) * seq_len:][:seq_len + 1]
            np.testing.assert_array_equal(b["inputs"][row], w[:-1])
            np.testing.assert_array_equal(b["targets"][row], w[1:])
        np.testing.assert_array_equal(b["positions"], np.tile(np.arange(seq_len), (bs, 1)))
        assert (b["segment_ids"] == 1).all() and (b["loss_mask"] == 1).all()
        assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32


def test_packing_hand_example(tmp_path):
    chars = CharTokenizer(tmp_path / "chars.txt")
    prepare_shards(["ab", "abc", "a", "abcdefghijklmno"], chars, tmp_path / "d", val_fraction=0, workers=1)
    rows = PackedRows(SplitReader(tmp_path / "d", "train"), seq_len=8)
    a, b, c, e = 98, 99, 100, 0
    # The 16-token document is cut into 9 + 8 tokens overlapping by one: a full row, then a shared row.
    assert len(rows) == 3
    full, packed, tail = rows[0], rows[1], rows[2]
    assert full["inputs"].tolist() == list(range(98, 106)) and full["loss_mask"].tolist() == [1] * 8
    assert packed["inputs"].tolist() == [a, b, e, a, b, c, e, a]
    assert packed["targets"].tolist() == [b, e, a, b, c, e, a, e]
    assert packed["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 3]
    assert packed["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert packed["loss_mask"].tolist() == [1, 1, 0, 1, 1, 1, 0, 1]  # no target across a document boundary
    assert tail["inputs"].tolist() == [ord(x) % 200 + 1 for x in "ijklmno"] + [e]
    assert tail["segment_ids"].tolist() == [1] * 8 and tail["positions"].tolist() == list(range(8))
    assert tail["loss_mask"].tolist() == [1] * 7 + [0]  # eos -> padding


def _pack_plan_loop(lengths, seq_len):
    """The reference: next-fit over every document's chunks, one at a time (the loop pack_plan vectorizes)."""
    width, full, packed, fill = seq_len + 1, [], [], seq_len + 1
    for d, length in enumerate(lengths.tolist()):
        for s in range(0, length - 1, seq_len):
            c = min(width, length - s)
            if c == width:
                full.append([(d, s, c)])
                continue
            if fill + c > width:
                packed.append([])
                fill = 0
            packed[-1].append((d, s, c))
            fill += c
    rows = full + packed
    chunks = np.asarray([c for r in rows for c in r], dtype=np.int64).reshape(-1, 3)
    return np.cumsum([0] + [len(r) for r in rows]), chunks[:, 0], chunks[:, 1], chunks[:, 2]


@pytest.mark.parametrize("block", [7, 1 << 22])
def test_pack_plan_matches_the_reference_loop(monkeypatch, block):
    monkeypatch.setattr(loader_mod, "_BLOCK", block)  # blocks of 7 documents: block edges everywhere
    rng = np.random.default_rng(0)
    cases = [(np.array([1, 1, 2, 9, 10, 17, 18, 19, 1]), 8), (np.array([], np.int64), 4), (np.array([1]), 4)]
    cases += [(rng.integers(1, 3 * s + 5, int(rng.integers(1, 80))), s) for s in rng.integers(1, 20, 200)]
    for lengths, seq_len in cases:
        got, want = pack_plan(lengths, int(seq_len)), _pack_plan_loop(lengths, int(seq_len))
        for g, w in zip(got, want, strict=True):
            assert g.tolist() == w.tolist(), (lengths, seq_len)


def test_packed_batches(tok, data_dir):
    epoch = list(make_dataset(data_dir, seq_len=32, global_batch_size=4, seed=0, packing=True, num_epochs=1))
    seg, mask = np.concatenate([b["segment_ids"] for b in epoch]), np.concatenate([b["loss_mask"] for b in epoch])
    assert seg.max() > 1 and (mask[seg == 0] == 0).all()
    assert mask.mean() > 0.8  # greedy packing leaves little padding


@pytest.mark.parametrize("packing", [False, True])
def test_seed_determinism(data_dir, packing):
    kw = dict(seq_len=16, global_batch_size=4, packing=packing)
    a, b = batches(make_dataset(data_dir, seed=3, **kw), 4), batches(make_dataset(data_dir, seed=3, **kw), 4)
    other = batches(make_dataset(data_dir, seed=4, **kw), 4)
    for x, y in zip(a, b, strict=True):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, other, strict=True))


def _rows(batch):
    return sorted(batch["inputs"][i].tobytes() + batch["targets"][i].tobytes() for i in range(len(batch["inputs"])))


def test_processes_get_disjoint_slices_of_the_global_batch(data_dir):
    kw = dict(seq_len=16, global_batch_size=4, seed=7)
    whole = make_dataset(data_dir, **kw)
    n_steps = 12  # runs past the end of the first epoch
    single = batches(whole, n_steps)
    parts = [batches(make_dataset(data_dir, process_index=p, process_count=2, **kw), n_steps) for p in range(2)]
    for step in range(n_steps):
        p0, p1 = _rows(parts[0][step]), _rows(parts[1][step])
        assert len(p0) == len(p1) == 2 and not set(p0) & set(p1)
        assert sorted(p0 + p1) == _rows(single[step])


def test_epochs_cover_every_window_once(tok, data_dir):
    stream = flat(encoded(tok, "train"))
    n_windows = (len(stream) - 1) // 16
    ds = make_dataset(data_dir, seq_len=16, global_batch_size=4, seed=0, num_epochs=1)
    got = list(ds)
    assert len(got) == n_windows // 4
    seen = [r for b in got for r in _rows(b)]
    assert len(set(seen)) == len(seen) == n_windows // 4 * 4


@pytest.mark.parametrize("prefetch", [False, True])
def test_iterator_state_resumes_exactly(data_dir, prefetch):
    ds = make_dataset(data_dir, seq_len=16, global_batch_size=4, seed=1, prefetch=prefetch)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = iter(make_dataset(data_dir, seq_len=16, global_batch_size=4, seed=1, prefetch=prefetch))
    resumed.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(resumed)["inputs"], e["inputs"])


def test_iterator_checkpoints_through_orbax(data_dir, tmp_path):
    import orbax.checkpoint as ocp

    make = lambda: iter(make_dataset(data_dir, seq_len=16, global_batch_size=4, seed=2, packing=True))
    it = make()
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    expected = next(it)
    resumed = make()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    got = next(resumed)
    for k in KEYS:
        np.testing.assert_array_equal(got[k], expected[k])


def test_eval_batches(tok, data_dir):
    stream = np.asarray(flat(encoded(tok, "val")))
    got = make_eval_batches(data_dir, seq_len=8, batch_size=2, max_batches=3)
    assert len(got) == 3
    np.testing.assert_array_equal(got[1]["inputs"][1], stream[24:32])
    again = make_eval_batches(data_dir, seq_len=8, batch_size=2, max_batches=3)
    assert all((x["inputs"] == y["inputs"]).all() for x, y in zip(got, again, strict=True))
    n_windows = (len(stream) - 1) // 8
    assert len(make_eval_batches(data_dir, seq_len=8, batch_size=2, max_batches=10**6)) == n_windows // 2
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_eval_batches(data_dir, seq_len=len(stream), batch_size=1, max_batches=1)


def test_loader_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        make_dataset(data_dir, seq_len=16, global_batch_size=4, seed=0, process_count=3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_dataset(data_dir, seq_len=100_000, global_batch_size=4, seed=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dataset(tmp_path / "nowhere", seq_len=16, global_batch_size=4, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no token shards.*prepare_data"):
        read_metadata(tmp_path / "empty")


def test_tokenizer_mismatch(tok, data_dir, tmp_path):
    other = load_tokenizer(train_sentencepiece(DOCS, tmp_path / "other", 300))
    with pytest.raises(ValueError, match="made with tokenizer"):
        check_compatible(read_metadata(data_dir), other)
    with pytest.raises(ValueError, match="made with tokenizer"):
        resolve_data(_config(data_dir, tokenizer=str(other.path)))


def _config(path, tokenizer="", seq_len=16, cache_dir=""):
    c = base_config()
    c.seq_len = seq_len
    c.data.update(path=str(path), tokenizer=tokenizer, default_vocab_size=300, cache_dir=str(cache_dir))
    return c


def test_resolve_data(tok, data_dir):
    spec = resolve_data(_config(data_dir))
    assert spec.path == data_dir and spec.tokenizer.identity() == tok.identity()
    ident = spec.identity()
    assert ident["tokenizer"]["sha256"] == tok.identity()["sha256"] and ident["path"] == str(data_dir)
    assert ident["train_tokens"] == spec.meta["splits"]["train"]["tokens"]
    json.dumps(ident)
    spec.check_model_vocab(400)
    with pytest.raises(ValueError, match=r"vocab_size 400 .* only 399"):
        spec.check_model_vocab(399)
    assert resolve_data(_config(data_dir, tokenizer=str(tok.path))).path == data_dir
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data(_config(data_dir.parent / "missing"))
    with pytest.raises(ValueError, match="too few for one window"):
        resolve_data(_config(data_dir, seq_len=10**7))


def test_default_dataset_builds_once(tmp_path, monkeypatch):
    monkeypatch.setattr(default_mod, "stdlib_documents", lambda report: iter(DOCS * 3))
    data_dir, tok_path = default_mod.ensure_default_dataset(tmp_path, vocab_size=300, workers=1)
    assert tok_path.is_file() and tok_path.parent == data_dir and data_dir.parent == tmp_path
    assert read_metadata(data_dir)["splits"]["train"]["documents"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [data_dir.name]
    monkeypatch.setattr(default_mod, "_build", lambda *a: pytest.fail("rebuilt a cached corpus"))
    assert default_mod.ensure_default_dataset(tmp_path, vocab_size=300) == (data_dir, tok_path)
    monkeypatch.setenv("PHI_JAX_CACHE", str(tmp_path))
    spec = resolve_data(_config("", seq_len=16))
    assert spec.path == data_dir


def test_tfds_source_into_shards(tok, tmp_path):
    import tensorflow_datasets as tfds

    class TinyCode(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, d in enumerate(DOCS[:10]):
                yield i, {"text": d}

    TinyCode(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    docs = list(tfds_documents("tiny_code", data_dir=str(tmp_path / "tfds"), split="train", text_field="text"))
    assert sorted(docs) == sorted(DOCS[:10])
    prepare_shards(docs, tok, tmp_path / "d", val_fraction=0, workers=1)
    reader = SplitReader(tmp_path / "d", "train")
    assert [reader.document(i).tolist() for i in range(len(reader))] == [[*tok.encode(d), tok.eos_id] for d in docs]
    for t in (1, 0):  # two tasks, each reading its own records (random access): the same shards
        prepare_shards(tfds_documents("tiny_code", data_dir=str(tmp_path / "tfds")), tok, tmp_path / "two",
                       val_fraction=0, docs_per_shard=3, workers=1, num_tasks=2, task_index=t)
    merge_shards(tmp_path / "two")
    reader = SplitReader(tmp_path / "two", "train")
    assert [reader.document(i).tolist() for i in range(len(reader))] == [[*tok.encode(d), tok.eos_id] for d in docs]
    with pytest.raises(ValueError, match=r"no field 'content'.*pass --text_field"):
        next(tfds_documents("tiny_code", data_dir=str(tmp_path / "tfds"), split="train", text_field="content"))


def test_file_and_jsonl_sources(tmp_path):
    (tmp_path / "b.py").write_text("b\n")
    (tmp_path / "a.py").write_text("a\n")
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe")
    assert list(file_documents(str(tmp_path / "*.py"))) == ["a\n", "b\n"]
    with pytest.raises(FileNotFoundError):
        list(file_documents(str(tmp_path / "*.rs")))
    (tmp_path / "x.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n{"body": "three"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:4: no field 'text' \(its fields: \['body'\]; the text field is "
                                         r"named by --text_field\)\. .*--skip_bad_lines"):
        list(jsonl_documents(str(tmp_path / "x.jsonl")))
    assert list(itertools.islice(jsonl_documents(str(tmp_path / "x.jsonl")), 2)) == ["one", "two"]
    report = SkipReport()  # a record without the field is a bad line like any other: skipped and counted
    assert list(jsonl_documents(str(tmp_path / "x.jsonl"), report=report, skip_bad_lines=True)) == ["one", "two"]
    assert report["bad_lines"] == 1 and "x.jsonl:4: no field 'text'" in report["examples"][0]


@pytest.mark.slow
def test_full_default_dataset(tmp_path):
    data_dir, tok_path = default_mod.ensure_default_dataset(tmp_path, vocab_size=8192)
    meta = read_metadata(data_dir)
    assert meta["splits"]["train"]["documents"] > 1500 and meta["splits"]["train"]["tokens"] > 5_000_000
    tok = load_tokenizer(tok_path)
    first = next(stdlib_documents())
    assert tok.decode(SplitReader(data_dir, "val").document(0)[:-1]) == first  # document 0 is always validation
    b = batches(make_dataset(data_dir, seq_len=2048, global_batch_size=16, seed=0), 2)[1]
    assert b["inputs"].shape == (16, 2048) and b["inputs"].max() < 8192


def test_the_validation_split_is_gathered_into_few_files(tok, tmp_path):
    """Each piece holds ~val_fraction of its documents: they are written into files of up to docs_per_shard
    documents (an ArrayRecord file is at least 128 KiB), in document order, whatever the number of pieces."""
    docs = DOCS * 3
    prepare_shards(docs, tok, tmp_path / "d", val_fraction=0.2, docs_per_shard=20, workers=1)
    meta = read_metadata(tmp_path / "d")
    val = [i for i in range(len(docs)) if is_val(i, 0.2)]
    assert len(meta["splits"]["train"]["shards"]) == 13  # one per piece of 20 documents
    assert len(val) == 50  # 4 in each piece of 20, 2 in the last piece (6 documents)
    assert [s["records"] for s in meta["splits"]["val"]["shards"]] == [20, 20, 10]
    reader = SplitReader(tmp_path / "d", "val")
    assert [reader.document(k).tolist() for k in range(len(reader))] == [[*tok.encode(docs[i]), tok.eos_id]
                                                                         for i in val]
