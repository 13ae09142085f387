"""Supervised fine-tuning: records, templates, shards with a loss mask, whole-example packing, and the masked loss."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import optax
import pytest
from runs import documents
from test_train_step import synthetic_batch

from phi_jax.config import Compute, PhiConfig
from phi_jax.data.corpus import SkipReport
from phi_jax.data.loader import SftRows, make_dataset, make_eval_batches
from phi_jax.data.prepare import prepare_shards
from phi_jax.data.sft import BadRecord, SftEncoder, Template, sft_documents
from phi_jax.data.shards import SplitReader
from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from phi_jax.sharding import make_mesh
from phi_jax.train_step import train_step
from phi_jax.trainer import build_trainer
from tools import prepare_data

GOOD = [
    {"prompt": "Q: what is two plus two?\nA:", "completion": " four"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                  {"role": "assistant", "content": "Goodbye."}]},
]


def records(n: int, seed: int = 0) -> list[dict]:
    """Examples of varied lengths (some longer than a 64-token row)."""
    rng = np.random.default_rng(seed)
    words = ["def", "return", "value", "print", "class", "import", "lambda", "yield", "while", "for"]
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(words, rng.integers(1, 12)))
        completion = " ".join(rng.choice(words, rng.integers(1, 30 if i % 7 else 60)))
        out.append({"prompt": prompt, "completion": completion} if i % 2 else
                   {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]})
    return out


def write_jsonl(path, recs, raw_lines=()) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "".join(line + "\n" for line in raw_lines))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(documents(10), tmp_path_factory.mktemp("tok") / "sp", vocab_size=512))


@pytest.fixture(scope="module")
def sft_shards(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    src = write_jsonl(root / "train.jsonl", GOOD + records(200))
    prepare_shards(sft_documents([src]), tokenizer, root / "shards", val_fraction=0.1, docs_per_shard=64,
                   workers=1, encode=SftEncoder())
    return root / "shards"


BAD = [  # (line, what the error says)
    ("{not json", "Expecting property name"),
    ('["a", "list"]', "a JSON list, not an object"),
    ('{"prompt": "p"}', "no field 'completion'"),
    ('{"completion": "c"}', "no field 'prompt'"),
    ('{"prompt": "p", "completion": ""}', "empty completion"),
    ('{"prompt": "p", "completion": 3}', "field 'completion' is int, not a string"),
    ('{"text": "t"}', "neither 'messages' nor 'prompt'/'completion'"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
     "empty assistant message"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', "no field 'content'"),
    ('{"messages": [{"role": "user", "content": "x"}], "prompt": "p", "completion": "c"}', "give one form"),
]


@pytest.mark.parametrize("line,message", BAD, ids=[m for _, m in BAD])
def test_a_bad_record_is_an_error_naming_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD, [line])
    with pytest.raises(BadRecord, match=f"d.jsonl:3: .*{message}.*--skip_bad_lines"):
        list(sft_documents([path]))
    report = SkipReport()
    assert len(list(sft_documents([path], report, skip_bad_lines=True))) == 2
    assert report["bad_lines"] == 1 and "d.jsonl:3" in report["examples"][0]


def test_the_template_marks_only_completions_and_assistant_turns(tokenizer):
    enc = SftEncoder()
    for record, trained_text in [(GOOD[0], " four"), (GOOD[1], "Hello!\nGoodbye.\n")]:
        doc = next(sft_documents_of([record]))
        ids, mask = enc(tokenizer, doc)
        assert ids[-1] == tokenizer.eos_id and mask[-1] == 1  # the example ends with a trained part
        trained = [i for i, m in zip(ids[:-1], mask[:-1], strict=True) if m]
        assert tokenizer.decode(trained) == trained_text
        context = "".join(tokenizer.decode([i]) for i, m in zip(ids, mask, strict=True) if not m)
        assert ("User: Hi there" in context and "Assistant: " in context) if "messages" in record else \
            context.startswith("Q: what is two plus two?")
    custom = Template(user="<|user|>{content}<|end|>", assistant="<|assistant|>{content}<|end|>", name="custom")
    ids, mask = SftEncoder(custom)(tokenizer, next(sft_documents_of([GOOD[1]])))
    assert tokenizer.decode([i for i, m in zip(ids[:-1], mask[:-1], strict=True) if m]) == \
        "Hello!<|end|>Goodbye.<|end|>"
    with pytest.raises(ValueError, match="exactly once"):
        Template(user="no placeholder")


def sft_documents_of(recs):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "r.jsonl"
    return sft_documents([write_jsonl(path, recs)])


def test_template_file_and_its_errors(tmp_path):
    from phi_jax.data.sft import TEMPLATES_DIR

    assert Template.load(TEMPLATES_DIR / "plain.toml") == Template()  # the shipped file is the default
    (tmp_path / "chat.toml").write_text('user = "<u>{content}</u>"\nassistant = "<a>{content}</a>"\n')
    t = Template.load(tmp_path / "chat.toml")
    assert (t.user, t.assistant, t.system, t.name) == ("<u>{content}</u>", "<a>{content}</a>", "{content}\n\n", "chat")
    (tmp_path / "bad.toml").write_text('usr = "{content}"\n')
    with pytest.raises(ValueError, match=r"unknown keys \['usr'\]"):
        Template.load(tmp_path / "bad.toml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Template.load(tmp_path / "missing.toml")


def test_packing_keeps_examples_whole_and_never_crosses_them(sft_shards):
    reader = SplitReader(sft_shards, "train")
    seq_len = 64
    rows = SftRows(reader, seq_len)
    assert rows.truncated == int((reader.lengths > seq_len + 1).sum()) > 0
    seen = []
    for r in range(len(rows)):
        ex = rows[r]
        first = int(rows.row_ptr[r])
        tokens = np.concatenate([ex["inputs"], ex["targets"][-1:]])
        seg = ex["segment_ids"]
        for s in range(1, seg.max() + 1):
            at = np.flatnonzero(seg == s)
            k = first + s - 1
            ids, mask = reader.example(k)
            c = int(rows.len[k])
            # the segment is example k (whole, or its first seq_len + 1 tokens), positions restarting at 0
            span = tokens[at[0]:at[0] + c]
            np.testing.assert_array_equal(span, ids[:c])
            np.testing.assert_array_equal(ex["positions"][at], np.arange(len(at)))
            # a target counts iff it is in the same example and marked trained there
            expected = mask[1:c].astype(np.float32)
            np.testing.assert_array_equal(ex["loss_mask"][at[0]:at[0] + c - 1], expected)
            if at[-1] + 1 < seq_len:
                assert ex["loss_mask"][at[-1]] == 0  # never a target across the boundary
            seen.append(k)
        assert (seg[seg > 0] == np.sort(seg[seg > 0])).all()
    assert seen == list(range(len(reader)))  # every example once, in order


def test_loader_and_eval_batches_carry_the_mask(sft_shards):
    batch = next(iter(make_dataset(sft_shards, seq_len=64, global_batch_size=4, seed=0, packing=True)))
    assert batch["loss_mask"].dtype == np.float32 and 0 < batch["loss_mask"].mean() < 1
    assert make_eval_batches(sft_shards, seq_len=64, batch_size=2, max_batches=1)[0]["loss_mask"].sum() > 0
    with pytest.raises(ValueError, match=r"data\.packing=True"):
        make_dataset(sft_shards, seq_len=64, global_batch_size=4, seed=0, packing=False)


def test_prepare_data_cli_strict_refuses_long_examples_naming_the_line(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "d.jsonl", [*GOOD, {"prompt": "p", "completion": " ".join(["word"] * 80)}])
    args = ["--source=sft", f"--jsonl={src}", f"--tokenizer={tokenizer.path}", "--workers=1", "--val_fraction=0"]
    with pytest.raises(BadRecord, match=r"d.jsonl:3: the example is \d+ tokens, longer than 65"):
        prepare_data.main([*args, f"--out={tmp_path / 'strict'}", "--seq_len=64", "--strict"])
    with pytest.raises(SystemExit):  # --seq_len does nothing without --strict: a usage error
        prepare_data.main([*args, f"--out={tmp_path / 'ok'}", "--seq_len=64"])
    prepare_data.main([*args, f"--out={tmp_path / 'ok'}"])
    meta = json.loads((tmp_path / "ok" / "metadata.json").read_text())
    assert meta["loss_mask"] and meta["encoding"]["template"]["name"] == "plain"
    assert meta["splits"]["train"]["documents"] == 3


_STEP = jax.jit(train_step)  # one compilation per batch shape for the whole module


@functools.cache
def sgd_state():
    """Plain SGD at lr 1 makes a step's update the gradient itself."""
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    return build_trainer(PhiConfig.preset("tiny"), Compute(), sgd, make_mesh(devices=jax.devices()[:1])).init_state()


def grads_and_loss(batch, accum: int):
    """(loss, target tokens, gradients) of one train step from the same parameters."""
    state = sgd_state()
    before = jax.tree.map(np.asarray, state.params)
    after, m = _STEP(state, {k: v.reshape(accum, -1, v.shape[-1]) for k, v in batch.items()})
    return float(m["loss"]), float(m["tokens"]), jax.tree.map(lambda a, b: a - np.asarray(b), before, after.params)


def prompt_masked_batch(rows: int = 8, seq: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows whose first part (a prompt of uneven length) is not a target."""
    batch = {k: v[0] for k, v in synthetic_batch(rows, 1, seed=seed).items()}
    prompt = np.random.default_rng(seed).integers(1, seq - 2, rows)
    batch["loss_mask"] = (np.arange(seq)[None, :] >= prompt[:, None]).astype(np.float32)
    return batch


def test_tokens_under_the_mask_change_neither_loss_nor_gradients():
    batch = prompt_masked_batch()
    loss, _, grads = grads_and_loss(batch, 1)
    changed = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"],
                                           (batch["targets"] + 17) % 64).astype(np.int32))
    assert (changed["targets"] != batch["targets"]).sum() > 20
    loss2, _, grads2 = grads_and_loss(changed, 1)
    assert loss2 == loss
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(a, b)
    # a change under a mask one moves both (the comparison can see a change)
    flipped = dict(batch, targets=((batch["targets"] + 17) % 64).astype(np.int32))
    assert grads_and_loss(flipped, 1)[0] != loss


def test_accumulation_with_uneven_masks_equals_one_large_batch():
    batch = prompt_masked_batch()
    batch["loss_mask"][:2] = 0.0  # micro-batch 0 of 4 has no target at all, the others differ in count
    batch["loss_mask"][2, :-1] = 0.0  # micro-batch 1: one target
    loss1, tokens1, g1 = grads_and_loss(batch, 1)
    loss4, tokens4, g4 = grads_and_loss(batch, 4)
    assert tokens1 == tokens4 == batch["loss_mask"].sum()
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
    # the mean of the micro-batches' means would be another number: the test can tell the two apart
    from phi_jax.train_step import loss_sum

    state = sgd_state()
    per_mb = [loss_sum(state.params, state.graphdef, {k: v[i * 2:(i + 1) * 2] for k, v in batch.items()})
              for i in range(1, 4)]
    assert abs(np.mean([float(t) / float(n) for t, n in per_mb]) - loss1) > 1e-3
