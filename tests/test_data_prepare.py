"""Preparation at scale and bad data: workers, resume after a kill, several tasks + merge, counted skips, shard
integrity at open, directories that stay closed."""

import json
from pathlib import Path

import pytest

from phi_jax.data.corpus import SkipReport, file_documents, jsonl_documents
from phi_jax.data.loader import make_dataset
from phi_jax.data.prepare import merge_shards, prepare_shards, work_dir
from phi_jax.data.shards import SplitReader, is_val, read_metadata, verify_checksums
from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from phi_jax.data.training_data import resolve_data
from phi_jax.run_config import base_config
from tools.prepare_data import main as prepare_data_cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [f"class C{i}:\n    x = {'y' * (i % 17)}\n" * (1 + i % 4) for i in range(130)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(DOCS, tmp_path_factory.mktemp("tok") / "sp", 300))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _tokens(d: Path) -> dict[str, list[list[int]]]:
    readers = {s: SplitReader(d, s) for s in ("train", "val")}
    return {s: [r.document(i).tolist() for i in range(len(r))] for s, r in readers.items()}


KW = dict(val_fraction=0.1, docs_per_shard=20, source="docs")


@pytest.fixture(scope="module")
def whole(tok, tmp_path_factory):
    """The uninterrupted single-task reference."""
    out = tmp_path_factory.mktemp("whole") / "d"
    prepare_shards(DOCS, tok, out, workers=1, **KW)
    return out


def test_three_tasks_then_merge_equal_one_task_token_for_token(tok, whole, tmp_path):
    out = tmp_path / "d"
    for t in (2, 0):
        assert prepare_shards(DOCS, tok, out, workers=1, num_tasks=3, task_index=t, **KW) is None
    with pytest.raises(FileNotFoundError, match=r"tasks \['task-00001-of-00003.json'\] have not finished"):
        merge_shards(out)
    prepare_shards(DOCS, tok, out, workers=2, num_tasks=3, task_index=1, **KW)
    meta = merge_shards(out)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(DOCS)
    assert _tokens(out) == _tokens(whole)
    assert _files(out) == _files(whole)  # every byte, metadata.json included
    assert not work_dir(out).exists()
    assert len(meta["splits"]["train"]["shards"]) == 7  # 130 documents in pieces of 20


BAD = (3, 25, 27, 44, 61, 88, 101)  # in pieces 0, 1, 1, 2, 3, 4, 5 of 20: tasks 0, 1, 1, 2, 0, 1, 2 of 3


def _bad_sources(tmp_path: Path, tok) -> dict[str, list[str]]:
    """DOCS as files and as JSON Lines, with bad units (binary / non-UTF-8 files, bad lines) at BAD and blank
    lines (not units) between."""
    src = tmp_path / "src"
    src.mkdir()
    lines = []
    for i, doc in enumerate(DOCS):
        bad = i in BAD
        (src / f"{i:03d}.py").write_bytes((b"\x00bin" if i % 2 else b"caf\xe9") if bad else doc.encode())
        lines.append(("[1]" if i % 2 else '{"text": 7}') if bad else json.dumps({"text": doc}))
        if i % 9 == 0:
            lines.append("  ")
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    common = [f"--tokenizer={tok.path}", "--docs_per_shard=20", "--val_fraction=0.1", "--workers=1"]
    return {"files": ["--source=files", f"--glob={src}/*.py", *common],
            "jsonl": ["--source=jsonl", f"--jsonl={tmp_path / 'c.jsonl'}", "--skip_bad_lines", *common]}


@pytest.mark.parametrize("kind", ["files", "jsonl"])
def test_tasks_of_a_source_with_bad_units_merge_to_one_task_byte_for_byte(tok, tmp_path, kind):
    """Files and JSON Lines are split by unit (file, line) before decoding; a bad unit is a hole in its piece,
    counted by the task that decoded it, and the merged skip report is the single task's."""
    args = _bad_sources(tmp_path, tok)[kind]
    prepare_data_cli([*args, f"--out={tmp_path / 'one'}"])
    for t in (2, 0, 1):
        prepare_data_cli([*args, f"--out={tmp_path / 'three'}", "--num_tasks=3", f"--task_index={t}"])
    prepare_data_cli(["--merge", f"--out={tmp_path / 'three'}"])
    assert _files(tmp_path / "one") == _files(tmp_path / "three")  # metadata.json (its skip report) included
    meta = read_metadata(tmp_path / "three")
    counts = {k: meta["skipped"][k] for k in ("bad_lines", "non_utf8_files", "binary_files")}
    assert counts == ({"bad_lines": 7, "non_utf8_files": 0, "binary_files": 0} if kind == "jsonl" else
                      {"bad_lines": 0, "non_utf8_files": 2, "binary_files": 5})
    where = [(e.split(": ")[0].split(":")[-1] if kind == "jsonl" else e.split(": ")[0][-6:-3])
             for e in meta["skipped"]["examples"]]
    lineno = {i: i + 1 + (i + 8) // 9 for i in BAD}  # a blank line after every 9th document, from document 0
    assert where == ([str(lineno[i]) for i in BAD[:5]] if kind == "jsonl" else [f"{i:03d}" for i in BAD[:5]])
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(DOCS) - len(BAD)
    want = [d for i, d in enumerate(DOCS) if i not in BAD and not is_val(i, 0.1)]
    assert _tokens(tmp_path / "three")["train"] == [[*tok.encode(d), tok.eos_id] for d in want]


@pytest.mark.parametrize("kind", ["files", "jsonl"])
def test_a_task_decodes_only_its_own_pieces(tok, tmp_path, monkeypatch, kind):
    """Task 0 of 4 (pieces 0 and 4 of 20 documents) reads and decodes documents 0-19 and 80-99 only, not the whole
    source; the other units are listed (a file name, a line split off) but never decoded."""
    from phi_jax.data import corpus

    args = _bad_sources(tmp_path, tok)[kind]
    decoded = []
    if kind == "files":
        read_text = corpus._read_text
        monkeypatch.setattr(corpus, "_read_text", lambda p, *a: decoded.append(int(p.stem)) or read_text(p, *a))
    else:
        loads = json.loads
        index = {d: i for i, d in enumerate(DOCS)}

        def counting_loads(text, *a, **k):
            record = loads(text, *a, **k)
            if isinstance(record, dict) and record.get("text") in index:
                decoded.append(index[record["text"]])
            return record

        monkeypatch.setattr(json, "loads", counting_loads)
    prepare_data_cli([*args, f"--out={tmp_path / 'd'}", "--num_tasks=4", "--task_index=0"])
    mine = [i for i in [*range(0, 20), *range(80, 100)] if kind == "files" or i not in BAD]
    assert decoded == mine


def test_an_interrupted_task_with_holes_resumes_and_matches(tok, tmp_path, monkeypatch):
    """A task of a JSON Lines source with bad lines, interrupted in piece 3, resumes: its finished pieces (holes
    included) pass the input check and are not tokenized again, and the merge equals an uninterrupted task."""
    from phi_jax.data import corpus

    args = [*_bad_sources(tmp_path, tok)["jsonl"], "--num_tasks=2"]
    for t in (0, 1):
        prepare_data_cli([*args, f"--out={tmp_path / 'whole'}", f"--task_index={t}"])
    prepare_data_cli(["--merge", f"--out={tmp_path / 'whole'}"])
    decode = corpus.JsonlSource.decode

    def interrupted(self, unit):
        if unit[2].startswith(json.dumps({"text": DOCS[65]}).encode()):  # piece 3: task 1's second piece
            raise KeyboardInterrupt
        return decode(self, unit)

    with monkeypatch.context() as m:
        m.setattr(corpus.JsonlSource, "decode", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare_data_cli([*args, f"--out={tmp_path / 'd'}", "--task_index=1"])
    assert sorted(p.name for p in work_dir(tmp_path / "d").glob("piece-*.json")) == ["piece-00001.json"]
    counting = CountingTokenizer(tok)
    monkeypatch.setattr("tools.prepare_data.load_tokenizer", lambda path: counting)
    prepare_data_cli([*args, f"--out={tmp_path / 'd'}", "--task_index=1"])
    assert counting.calls == 19 + 19  # pieces 3 and 5 (a bad line in each), not piece 1 again
    prepare_data_cli([*args, f"--out={tmp_path / 'd'}", "--task_index=0"])
    prepare_data_cli(["--merge", f"--out={tmp_path / 'd'}"])
    assert _files(tmp_path / "d") == _files(tmp_path / "whole")


def test_tasks_that_read_different_sources_do_not_merge(tok, tmp_path):
    out = tmp_path / "d"
    prepare_shards(DOCS, tok, out, workers=1, num_tasks=2, task_index=0, **KW)
    prepare_shards(DOCS[:-1], tok, out, workers=1, num_tasks=2, task_index=1, **KW)
    with pytest.raises(ValueError, match="the tasks saw different sources"):
        merge_shards(out)
    # JSON Lines split by line: each task lists every line (not decoding the others'), so a line that differs in
    # length in a piece of the other task is still seen.
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d + "!" * (i == 70)}) + "\n"
                                              for i, d in enumerate(DOCS)))
    for t, name in enumerate(("a", "b")):
        prepare_shards(jsonl_documents(str(tmp_path / f"{name}.jsonl")), tok, tmp_path / "j", workers=1,
                       num_tasks=2, task_index=t, **KW)
    with pytest.raises(ValueError, match=r"different sources \(task-00001-of-00002.json counted 130 documents, "
                                         r"another 130, of other sizes\)"):
        merge_shards(tmp_path / "j")


class CountingTokenizer:
    """Counts encode calls of a real tokenizer (in-process, workers=1)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text):
        self.calls += 1
        return self.tok.encode(text)


def killed_after(n):
    yield from DOCS[:n]
    raise KeyboardInterrupt  # what a kill leaves: the pieces finished so far, nothing else


KILLED = """
import json, os, signal, sys
from phi_jax.data.prepare import prepare_shards
from phi_jax.data.tokenizer import load_tokenizer
docs, tok, out, n = json.load(open(sys.argv[1])), load_tokenizer(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def killed():
    yield from docs[:n]
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
prepare_shards(killed(), tok, out, workers=1, val_fraction=0.1, docs_per_shard=20, source="docs")
"""


def test_a_killed_preparation_resumes_and_matches(tok, whole, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "d"
    (tmp_path / "docs.json").write_text(json.dumps(DOCS))
    r = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / "docs.json"), str(tok.path), str(out), "70"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    work = work_dir(out)
    assert sorted(p.name for p in work.glob("piece-*.json")) == [f"piece-0000{i}.json" for i in range(3)]
    assert not out.exists()
    (work / "train-00003.array_record").write_bytes(b"half a piece")  # as if killed in the middle of piece 3
    counting = CountingTokenizer(tok)
    prepare_shards(DOCS, counting, out, workers=1, **KW)
    assert counting.calls == len(DOCS) - 60  # pieces 0-2 were not tokenized again
    assert _files(out) == _files(whole) and not work.exists()


def test_resume_refuses_changed_settings_or_documents(tok, tmp_path):
    out = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(killed_after(45), tok, out, workers=1, **KW)
    with pytest.raises(ValueError, match="other settings"):
        prepare_shards(DOCS, tok, out, workers=1, **{**KW, "docs_per_shard": 10})
    with pytest.raises(ValueError, match=r"documents of piece 0 differ .* the source changed"):
        prepare_shards(["changed", *DOCS[1:]], tok, out, workers=1, **KW)


def test_binary_and_non_utf8_files_are_counted_or_strict_errors(tok, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(22):
        (src / f"good{i:02d}.py").write_text(DOCS[i])
    (src / "bin1.py").write_bytes(b"\x00\x01\x02binary")
    (src / "bin2.py").write_bytes(bytes(range(256)))
    (src / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    base = ["--source=files", f"--glob={src}/*.py", f"--tokenizer={tok.path}", "--val_fraction=0.1", "--workers=1"]
    prepare_data_cli([*base, f"--out={tmp_path / 'd'}"])
    meta = read_metadata(tmp_path / "d")
    assert meta["skipped"]["binary_files"] == 2 and meta["skipped"]["non_utf8_files"] == 1
    assert any("latin1.py: not UTF-8 at byte 3" in e for e in meta["skipped"]["examples"])
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 22
    with pytest.raises(ValueError, match=r"bin1.py: a NUL byte at offset 0 .* drop --strict"):
        prepare_data_cli([*base, f"--out={tmp_path / 'strict'}", "--strict"])
    assert not (tmp_path / "strict").exists()
    report = SkipReport()
    assert len(list(file_documents(f"{src}/*.py", report))) == 22 and report["binary_files"] == 2


def test_a_split_left_empty_is_an_error_before_anything_is_written(tok, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"bin{i}.py").write_bytes(b"\x00" * 10)
    (src / "a_good.py").write_text(DOCS[0])  # file 0: validation (a file's index, holes included, picks its split)
    with pytest.raises(ValueError, match=r"gave 1 documents \(3 binary files skipped\): 0 train, 1 validation .*"
                                         r"--val_fraction=0"):
        prepare_data_cli(["--source=files", f"--glob={src}/*.py", f"--tokenizer={tok.path}", f"--out={tmp_path / 'd'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no partial work
    (src / "a_good.py").rename(src / "good.py")  # file 3: train; file 0, the one validation slot, is binary
    with pytest.raises(ValueError, match=r"gave 1 documents \(3 binary files skipped\): 1 train, 0 validation with "
                                         r"val_fraction=0.01: the validation documents .* were all skipped"):
        prepare_data_cli(["--source=files", f"--glob={src}/*.py", f"--tokenizer={tok.path}", f"--out={tmp_path / 'd'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with pytest.raises(ValueError, match=r"gave 0 documents \(none skipped\): 0 train, 0 validation"):
        prepare_shards([], tok, tmp_path / "v", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_malformed_jsonl_line_names_file_and_line(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "thr\n{"text": 4}\n[1]\n{"text": "five"}\n')
    base = ["--source=jsonl", f"--jsonl={path}", f"--tokenizer={tok.path}", "--val_fraction=0.3", "--workers=2"]
    with pytest.raises(ValueError, match=r"c.jsonl:3: Invalid control character.* pass --skip_bad_lines"):
        prepare_data_cli([*base, f"--out={tmp_path / 'd'}"])
    prepare_data_cli([*base, f"--out={tmp_path / 'd'}", "--skip_bad_lines"])
    meta = read_metadata(tmp_path / "d")
    assert meta["skipped"]["bad_lines"] == 3
    assert [e.split(": ")[0][-9:] for e in meta["skipped"]["examples"]] == ["c.jsonl:3", "c.jsonl:4", "c.jsonl:5"]
    assert "field 'text' is int, not a string" in meta["skipped"]["examples"][1]
    report = SkipReport()
    assert list(jsonl_documents(str(path), report=report, skip_bad_lines=True)) == ["one", "two", "five"]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _config(path):
    c = base_config()
    c.seq_len, c.data.path = 8, str(path)
    return c


def test_corrupted_or_truncated_shards_are_found_at_open(whole, tmp_path):
    d = _copy(whole, tmp_path / "flip")
    meta = read_metadata(d)
    shard = d / meta["splits"]["train"]["shards"][2]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-00002-of-00007.array_record does not match the sha256"):
        resolve_data(_config(d))
    d = _copy(whole, tmp_path / "cut")
    shard = d / "val-00000-of-00001.array_record"  # the 7 pieces' validation documents, gathered
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"val-00000-of-00001.array_record is \d+ bytes but metadata.json records"):
        read_metadata(d)
    d = _copy(whole, tmp_path / "records")  # a valid shard with its size and sha256, but the wrong record count
    meta = json.loads((d / "metadata.json").read_text())
    first, last = meta["splits"]["train"]["shards"][0], meta["splits"]["train"]["shards"][-1]
    (d / first["file"]).write_bytes((d / last["file"]).read_bytes())
    first.update(bytes=last["bytes"], sha256=last["sha256"])
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"train-00000-of-00007.array_record holds \d+ records but metadata.json "
                                         r"records 18"):
        verify_checksums(d, read_metadata(d))
    verify_checksums(whole, read_metadata(whole))


@pytest.mark.parametrize("key", ["tokenizer_file", "shard", "lengths"])
def test_metadata_cannot_point_outside_the_directory(whole, tmp_path, key):
    d = _copy(whole, tmp_path / "d")
    (tmp_path / "outside.model").write_bytes((d / read_metadata(d)["tokenizer_file"]).read_bytes())
    meta = json.loads((d / "metadata.json").read_text())
    if key == "tokenizer_file":
        meta["tokenizer_file"] = "../outside.model"
    elif key == "shard":
        meta["splits"]["train"]["shards"][0]["file"] = str(tmp_path / "outside.model")
    else:
        meta["splits"]["val"]["lengths"]["file"] = "sub/../../outside.model"
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"outside.model.*outside the directory"):
        resolve_data(_config(d))


def test_the_command_line_splits_and_merges(tok, tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    base = ["--source=jsonl", f"--jsonl={path}", f"--tokenizer={tok.path}", "--docs_per_shard=20", "--workers=1"]
    prepare_data_cli([*base, f"--out={tmp_path / 'one'}"])
    for t in (1, 0):
        prepare_data_cli([*base, f"--out={tmp_path / 'two'}", "--num_tasks=2", f"--task_index={t}"])
    assert "run: python -m tools.prepare_data --merge" in capsys.readouterr().out
    prepare_data_cli(["--merge", f"--out={tmp_path / 'two'}"])
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_overwrite_replaces_only_a_previous_preparation(tok, whole, tmp_path):
    """--overwrite may replace an empty directory or what a preparation wrote (the files its metadata.json lists),
    never a user's other files: those are named and nothing is deleted."""
    base = ["--source=jsonl", f"--tokenizer={tok.path}", "--workers=1", "--overwrite"]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:30]))
    user = tmp_path / "u"
    user.mkdir()
    (user / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"u is not a prepare_data output \(notes.txt\); --overwrite replaces "
                                              r"only an empty directory or a previous preparation"):
        prepare_data_cli([*base, f"--jsonl={src}", f"--out={user}"])
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"] and not work_dir(user).exists()
    prev = _copy(whole, tmp_path / "prev")
    (prev / "mine.txt").write_text("added by hand")
    with pytest.raises(FileExistsError, match=r"holds files the previous preparation did not write \(mine.txt\)"):
        prepare_data_cli([*base, f"--jsonl={src}", f"--out={prev}"])
    assert (prev / "mine.txt").exists() and _files(prev).keys() == {*_files(whole), "mine.txt"}
    (prev / "mine.txt").unlink()
    prepare_data_cli([*base, f"--jsonl={src}", f"--out={prev}"])  # a previous preparation: replaced
    assert read_metadata(prev)["splits"]["train"]["documents"] + read_metadata(prev)["splits"]["val"][
        "documents"] == 30
    (tmp_path / "empty").mkdir()
    prepare_data_cli([*base, f"--jsonl={src}", f"--out={tmp_path / 'empty'}"])  # an empty directory: filled
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        prepare_data_cli([*base, f"--jsonl={src}", f"--out={tmp_path / 'file'}"])


def test_tasks_started_at_once_do_not_collide(tok, whole, tmp_path):
    """The tasks of one preparation (a SLURM array) start together and write params.json and the tokenizer copy
    into one work directory: every writer has its own temporary name. Threads started by one barrier stand in for
    the processes (same files, tighter timing); with a shared temporary name, renames fail with 'No such file'."""
    import threading

    from phi_jax.data import prepare as prepare_mod

    errors = []
    for trial in range(3):
        out = tmp_path / f"d{trial}"
        barrier = threading.Barrier(4)

        def task(t, out=out, barrier=barrier):
            barrier.wait()
            try:
                prepare_shards(DOCS, tok, out, workers=1, num_tasks=4, task_index=t, **KW)
            except Exception as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=task, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        merge_shards(out)
        assert _files(out) == _files(whole)
    # The writers themselves, many at once on one file.
    barrier = threading.Barrier(8)

    def writer(i):
        barrier.wait()
        try:
            for _ in range(30):
                prepare_mod._write_json(tmp_path / "params.json", {"writer": i})
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert sorted(p.name for p in tmp_path.iterdir() if "params" in p.name) == ["params.json"]  # no .tmp left


def test_a_failed_preparation_says_what_it_kept(tok, tmp_path, caplog):
    """A record without the text field is one line naming file:line (no KeyError); the finished pieces before it
    are kept for the next run and said so; a failure with nothing finished leaves no .OUT.partial; with
    --skip_bad_lines the record is skipped and counted."""
    import logging

    caplog.set_level(logging.WARNING, logger="phi_jax")
    src = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS[:50]]
    lines[45] = json.dumps({"body": "no text field"})
    src.write_text("\n".join(lines) + "\n")
    base = ["--source=jsonl", f"--jsonl={src}", f"--tokenizer={tok.path}", "--workers=1", "--docs_per_shard=20",
            "--val_fraction=0.1"]
    with pytest.raises(ValueError, match=r"c.jsonl:46: no field 'text' \(its fields: \['body'\]; the text field "
                                         r"is named by --text_field\)\. Fix the line, or pass --skip_bad_lines"):
        prepare_data_cli([*base, f"--out={tmp_path / 'd'}"])
    kept = [m for m in caplog.messages if m.startswith("kept")]
    assert kept == [f"kept 2 finished piece(s) in {work_dir(tmp_path / 'd')}: the same command resumes from them "
                    "(skipping what is done); delete that directory to start over"], caplog.messages
    caplog.clear()
    lines[3] = "not json"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:4: Expecting value"):
        prepare_data_cli([*base, f"--out={tmp_path / 'e'}"])
    assert not work_dir(tmp_path / "e").exists() and not [m for m in caplog.messages if m.startswith("kept")]
    prepare_data_cli([*base, f"--out={tmp_path / 'f'}", "--skip_bad_lines", "--text_field=text"])
    meta = read_metadata(tmp_path / "f")
    assert meta["skipped"]["bad_lines"] == 2
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 48


def test_checksums_are_verified_once_per_dataset_until_a_file_changes(whole, tmp_path, monkeypatch):
    """verify_checksums hashes a dataset once per host: the verdict is kept, keyed by every file's size,
    modification time and inode; any rewrite (even of the same bytes) hashes again."""
    import os

    import phi_jax.data.shards as shards_mod

    d = _copy(whole, tmp_path / "d")
    hashed = []
    real = shards_mod.file_sha256
    monkeypatch.setattr(shards_mod, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    meta = read_metadata(d)
    files = len(meta["splits"]["train"]["shards"]) + len(meta["splits"]["val"]["shards"]) + 2
    verify_checksums(d, meta, cache_dir=tmp_path / "cache")
    assert len(hashed) == files
    verify_checksums(d, meta, cache_dir=tmp_path / "cache")
    assert len(hashed) == files  # remembered
    shard = d / meta["splits"]["train"]["shards"][1]["file"]
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data)  # the same bytes, rewritten: a new inode and mtime
    verify_checksums(d, meta, cache_dir=tmp_path / "cache")
    assert len(hashed) == 2 * files
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    stat = os.stat(shard)
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=rf"{shard.name} does not match the sha256 in metadata.json"):
        verify_checksums(d, meta, cache_dir=tmp_path / "cache")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the limit: a same-size, same-mtime, same-inode
    verify_checksums(d, meta, cache_dir=tmp_path / "cache")  # overwrite (a deliberate one) is not hashed again
    with pytest.raises(ValueError, match="does not match the sha256"):
        verify_checksums(d, meta)  # without a cache, every call hashes
    with pytest.raises(ValueError, match=rf"{shard.name} (failed, the file is damaged|cannot be read as ArrayRecord) "
                                         r"\(Corrupted Riegeli.*hash mismatch"):
        for _ in make_dataset(d, seq_len=8, global_batch_size=4, seed=0, num_epochs=1):  # with checksums off,
            pass  # the damaged record itself names its file
