"""gs:// workdirs and data against a real GCS JSON API server (gcp-storage-emulator, tests/gcs_emulator.py) on
127.0.0.1: train with the workdir and the shards in the bucket, SIGTERM, resume bit for bit, then export and generate
from the bucket; the emulator's generation preconditions, and the workdir lock raced for by several processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from gcs_emulator import BUCKET, gcs_emulator
from runs import ROOT, TINY_RUN, clean_env, losses, make_shards, run_cli, train_cmd

STEPS = 40  # ~10 ms a step: the SIGTERM sent on seeing step 3 lands well before the last step


@pytest.fixture(scope="module")
def gcs():
    """The emulator's environment, also set in this process (for etils.epath)."""
    with gcs_emulator() as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def shards(tmp_path_factory, gcs):
    """Token shards on disk and the same files in gs://bkt/data."""
    local = make_shards(tmp_path_factory.mktemp("data"))
    _upload(local, f"gs://{BUCKET}/data")
    return local


def _upload(local, url):
    from etils import epath

    for f in local.iterdir():
        (epath.Path(url) / f.name).write_bytes(f.read_bytes())


def _tool(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{proc.args}: {err[-3000:]}"
    return out


def test_the_emulator_keeps_gcs_generation_contract(gcs):
    """What tensorstore (orbax's OCDBT manifest) and the workdir lock rely on. The stock gcp-storage-emulator fails
    every check below: reads carried no generation (tensorstore saw 0, then refused its conditional write as
    "Malformed StorageGeneration"), preconditions were ignored, and a bounded listing listed the whole bucket."""
    import tensorstore as ts
    from google.api_core.exceptions import PreconditionFailed
    from google.cloud import storage

    kv = ts.KvStore.open({"driver": "gcs", "bucket": BUCKET, "path": "contract/"}).result()
    absent = kv.read("a").result().stamp.generation
    first = kv.write("a", b"1", if_equal=absent).result().generation
    assert first and kv.write("a", b"x", if_equal=absent).result().generation == b""  # it exists now: 412
    read = kv.read("a").result().stamp.generation  # a media read's x-goog-generation
    assert read == first and kv.read("a", byte_range=slice(0, 1)).result().stamp.generation == first
    second = kv.write("a", b"2", if_equal=read).result().generation  # stock: "Malformed StorageGeneration"
    assert second not in (b"", first)
    assert kv.write("a", b"3", if_equal=first).result().generation == b""  # a stale condition loses
    assert kv.read("a").result().value == b"2"
    assert kv.read("a", if_not_equal=second).result().state == "unspecified"  # 304: not modified
    kv.write("b", b"b").result()
    assert kv.list(ts.KvStore.KeyRange("a", "b")).result() == [b"a"]  # startOffset/endOffset

    blob = storage.Client().bucket(BUCKET).blob("contract/created")
    blob.upload_from_string("one", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        blob.upload_from_string("two", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        blob.delete(if_generation_match=blob.generation + 1)
    assert blob.download_as_text() == "one"
    blob.delete(if_generation_match=blob.generation)


def test_a_missing_or_incomplete_bucket_path_is_a_clear_error_within_seconds(shards):
    from etils import epath

    from phi_jax.data.shards import read_metadata

    partial = epath.Path(f"gs://{BUCKET}/partial")
    (partial / "metadata.json").write_text((shards / "metadata.json").read_text())
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=f"gs://{BUCKET}/nowhere does not exist"):
        read_metadata(f"gs://{BUCKET}/nowhere")
    with pytest.raises(FileNotFoundError, match=f"gs://{BUCKET}/partial misses train file"):
        read_metadata(partial)
    assert time.monotonic() - start < 10
    assert read_metadata(f"gs://{BUCKET}/data") == read_metadata(shards)


def test_train_sigterm_resume_export_and_generate_in_a_bucket(tmp_path, gcs, shards):
    """The reference run trains on local disk; the bucket run must match it bit for bit across a SIGTERM."""
    from etils import epath

    flags = [*TINY_RUN, f"--config.total_steps={STEPS}", "--config.checkpoint_every=1000"]
    # JAX's persistent compilation cache, shared by this test's processes: the reference run compiles the train step,
    # the bucket runs load it (~15 s less each; the same executable, so it cannot hide a difference in results).
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    reference = run_cli(tmp_path / "reference", f"--config.data.path={shards}", *flags, env=clean_env(**cache))
    assert reference.returncode == 0, reference.stderr[-3000:]

    env = clean_env(**gcs, **cache)
    workdir = f"gs://{BUCKET}/run"
    cmd = train_cmd(workdir, f"--config.data.path=gs://{BUCKET}/data", *flags)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + 180
    while not any("] step 3 " in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, "".join(lines)[-3000:]
    assert not any("Could not determine bucket type" in line for line in lines)
    saved = sorted(int(p.name) for p in epath.Path(workdir, "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < STEPS, saved

    resumed = run_cli(workdir, f"--config.data.path=gs://{BUCKET}/data", *flags, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved[0]}" in resumed.stderr
    records = [json.loads(line) for line in epath.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert got == losses(tmp_path / "reference")  # every step, bit for bit, across the restart
    assert any(p.name.startswith("events.out.tfevents") for p in epath.Path(workdir, "tensorboard").iterdir())
    assert not epath.Path(workdir, "lock.json").exists()

    # Export and generate read the bucket's checkpoint; each must give what it gives for the local reference run.
    # The bucket run's export carries the tokenizer it recorded, gs://bkt/data/sp512.model, read from the bucket.
    generate = ["phi_jax.generate", "--prompt=def f(x):", "--max_new_tokens=8"]
    export = ["tools.export_hf"]
    procs = [_tool(*generate, f"--model={workdir}", env=env),
             _tool(*generate, f"--model={tmp_path / 'reference'}", env=env),
             _tool(*export, f"--model={workdir}", f"--out={tmp_path / 'from_bucket'}", env=env),
             _tool(*export, f"--model={tmp_path / 'reference'}", f"--out={tmp_path / 'from_disk'}", env=env)]
    from_bucket, from_disk, *_ = [_finish(p) for p in procs]
    assert from_bucket == from_disk and from_disk.strip()
    exported = sorted(p.name for p in (tmp_path / "from_disk").iterdir())
    assert "model.safetensors" in exported and "tokenizer.json" in exported
    for name in exported:
        assert (tmp_path / "from_bucket" / name).read_bytes() == (tmp_path / "from_disk" / name).read_bytes(), name


def test_the_workdir_lock_in_a_bucket(gcs):
    """One process: a held lock refuses a second taker, is removed on release; a stale one is taken over."""
    from etils import epath

    from phi_jax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError

    url = f"gs://{BUCKET}/locked"
    with WorkdirLock(url) as first:
        assert json.loads(epath.Path(url, LOCK_NAME).read_text())["token"] == first.token
        with pytest.raises(WorkdirLockedError, match="in use by another trainer"):
            WorkdirLock(url).acquire()
    assert not epath.Path(url, LOCK_NAME).exists()
    epath.Path(url, LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then",
                                                      "token": "old", "heartbeat": time.time() - 100}))
    with WorkdirLock(url, stale_after_s=60) as lock:
        assert json.loads(epath.Path(url, LOCK_NAME).read_text())["token"] == lock.token
    assert not epath.Path(url, LOCK_NAME).exists()


_RACER = """
import json, sys
from etils import epath
from phi_jax.workdir_lock import WorkdirLock, WorkdirLockedError, _GcsStore

def race(url):
    lock = WorkdirLock(url, stale_after_s=60)
    try:
        lock.acquire()
        held.append(lock)
        return "won"
    except WorkdirLockedError:
        return "refused"
    except Exception as e:
        return type(e).__name__

base, held = sys.argv[1], []
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps("won" if _GcsStore(epath.Path(base, "bare", "lock.json")).create("mine") else "refused"), flush=True)
for name in ("fresh", "stale"):
    sys.stdin.readline()
    print(json.dumps(race(f"{base}/{name}")), flush=True)
sys.stdin.read()  # winners hold their locks until the test has counted
for lock in held:
    lock.release()
"""


def test_racing_processes_one_takes_the_bucket_lock(gcs):
    """Three processes race for gs:// locks at once: the bare create (`if_generation_match=0`), a free workdir, and the
    takeover of a stale lock (conditional delete, then create); each time exactly one wins. This relies on GCS's
    atomic preconditions, which the patched emulator keeps (on the stock one all three won the bare create)."""
    from etils import epath

    from phi_jax.workdir_lock import LOCK_NAME

    base = f"gs://{BUCKET}/race"
    epath.Path(base, "stale", LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then",
                                                                "token": "old", "heartbeat": time.time() - 100}))
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, base], cwd=ROOT, env=clean_env(**gcs), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(3)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 3
        for race in ("bare", "fresh", "stale"):
            for p in procs:  # all waiting on stdin: released together
                p.stdin.write("go\n")
                p.stdin.flush()
            outcomes = sorted(json.loads(p.stdout.readline()) for p in procs)
            assert outcomes.count("won") == 1, (race, outcomes)
            assert set(outcomes) - {"won"} <= {"refused"}, (race, outcomes)  # losers get the clear error
        tokens = {json.loads(epath.Path(base, name, LOCK_NAME).read_text())["token"] for name in ("fresh", "stale")}
        assert "old" not in tokens and len(tokens) == 2
    finally:
        for p in procs:
            p.stdin.close()
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert not epath.Path(base, "fresh", LOCK_NAME).exists() and not epath.Path(base, "stale", LOCK_NAME).exists()
