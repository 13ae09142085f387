"""LoRA fine-tuning end to end against the references: PEFT loads phi_jax's adapters on the transformers base model,
transformers loads the merged export, and a LoRA SFT run killed with SIGKILL resumes bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import jax
import numpy as np
import optax
import pytest
from hf_reference import hf_logits, make_hf_phi
from runs import ROOT, clean_env, losses, metrics, run_cli, train_cmd
from test_lora import randomize_adapters
from test_sft import GOOD, records, write_jsonl

import phi_jax
from phi_jax.checkpoint import read_meta
from phi_jax.config import Compute
from phi_jax.data.prepare import prepare_shards
from phi_jax.data.sft import SftEncoder, sft_documents
from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from phi_jax.hf import save_pretrained
from phi_jax.hf.peft import load_peft_adapters, save_peft
from phi_jax.lora import LoraConfig, is_adapter_path, load_lora_workdir, merge_lora
from phi_jax.model import from_params, init_model, stacked_params
from tools import export_hf

ATOL = 1e-4
PROMPT = np.random.default_rng(1).integers(0, 512, (1, 300))
LORA = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A random transformers PhiForCausalLM of the `tiny` preset's shape (sharp enough: init std 0.1)."""
    return make_hf_phi(tmp_path_factory.mktemp("base") / "hf", initializer_range=0.1)


def peft_logits(base_dir, adapter_dir, ids) -> np.ndarray:
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module")
def lora_model(hf_base):
    """phi_jax's LoRA model on the Hugging Face base, with random (non-zero) adapters."""
    base = stacked_params(phi_jax.from_pretrained(hf_base))
    adapters = {p: v for p, v in stacked_params(init_model(phi_jax.PhiConfig.preset("tiny"), lora=LORA)).items()
                if is_adapter_path(p)}
    return randomize_adapters(from_params(phi_jax.PhiConfig.preset("tiny"), Compute(), {**base, **adapters},
                                          lora=LORA), scale=0.2)


def adapters_of(model) -> dict:
    return {p: np.asarray(v) for p, v in stacked_params(model).items() if is_adapter_path(p)}


def test_peft_loads_the_adapters_on_the_base_model_and_matches(hf_base, lora_model, tmp_path):
    out = save_peft(adapters_of(lora_model), lora_model.cfg, LORA, tmp_path / "adapter", base=str(hf_base))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["dense", "fc1", "fc2", "k_proj", "q_proj", "v_proj"]
    ours = np.asarray(lora_model(PROMPT)[0])
    theirs = peft_logits(hf_base, out, PROMPT)
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)
    assert np.abs(theirs - hf_logits(hf_base, PROMPT)).max() > 100 * ATOL  # the adapters change the logits


def test_the_merged_export_matches_in_transformers(lora_model, tmp_path):
    out = save_pretrained(merge_lora(lora_model), tmp_path / "merged")
    np.testing.assert_allclose(hf_logits(out, PROMPT), np.asarray(lora_model(PROMPT)[0]), atol=ATOL, rtol=0)


def test_a_peft_adapter_imports_exactly_and_mismatches_are_refused(lora_model, tmp_path):
    out = save_peft(adapters_of(lora_model), lora_model.cfg, LORA, tmp_path / "adapter")
    imported = load_peft_adapters(out, lora_model.cfg, LORA)
    flat = {f"layers.{a}.{b}.lora.lora_{x}": imported["layers"][a][b]["lora"][f"lora_{x}"]
            for a, b in [("attn", "qkv"), ("attn", "dense"), ("mlp", "fc1"), ("mlp", "fc2")] for x in "ab"}
    expected = adapters_of(lora_model)
    assert flat.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_array_equal(flat[k], v)
    with pytest.raises(ValueError, match=r"has rank 4, alpha 8, .* the run has rank 8"):
        load_peft_adapters(out, lora_model.cfg, LoraConfig(rank=8, alpha=8.0))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(out / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"] += 1.0
    save_file(tensors, out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="different lora_A matrices for q_proj, k_proj and v_proj in layer 1"):
        load_peft_adapters(out, lora_model.cfg, LORA)


# ---------------------------------------------------------------------------------- a LoRA SFT run, end to end
STEPS, EVERY = 40, 10  # steps take ~20 ms here: a kill lands well inside the run


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sftdata")
    from runs import documents

    tok = load_tokenizer(train_sentencepiece(documents(10), root / "sp", vocab_size=512))
    src = write_jsonl(root / "train.jsonl", GOOD + records(120))
    prepare_shards(sft_documents([src]), tok, root / "shards", val_fraction=0.1, docs_per_shard=64, workers=1,
                   encode=SftEncoder())
    return root / "shards"


def lora_flags(shards, hf_base) -> list[str]:
    return ["--config.model=tiny", f"--config.data.path={shards}", "--config.data.packing=True",
            "--config.seq_len=64", "--config.batch_size=4", "--config.log_every=1", "--config.learning_rate=1e-2",
            "--config.eval_every=0", f"--config.total_steps={STEPS}", f"--config.checkpoint_every={EVERY}",
            f"--config.init_from_hf={hf_base}", "--config.lora.rank=4", "--config.lora.alpha=8.0",
            "--config.lora.dropout=0.1"]


@pytest.fixture(scope="module")
def reference_run(sft_data, hf_base, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_run")
    result = run_cli(workdir, *lora_flags(sft_data, hf_base))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow  # ~30 s: the SIGKILL'd run and its resumption; test_train covers resumption bitwise by default
def test_lora_sft_run_killed_with_sigkill_resumes_bitwise(reference_run, sft_data, hf_base, tmp_path):
    reference = losses(reference_run)
    assert sorted(reference) == list(range(1, STEPS + 1)) and reference[STEPS] < reference[1]
    rows = [r for r in metrics(reference_run) if "loss" in r]
    assert all(0 < r["tokens"] < 4 * 64 for r in rows)  # target tokens per step: the masked ones never count
    proc = subprocess.Popen(train_cmd(tmp_path, *lora_flags(sft_data, hf_base)), cwd=ROOT, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    durable = tmp_path / "checkpoints" / str(EVERY) / "commit_success.txt"  # a complete checkpoint
    logged = lambda: max(losses(tmp_path), default=0) if (tmp_path / "metrics.jsonl").exists() else 0
    try:
        while not (durable.exists() and logged() > EVERY):  # mid-run: past a checkpoint, before the end
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and logged() < STEPS
    resumed = run_cli(tmp_path, *lora_flags(sft_data, hf_base))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert losses(tmp_path) == reference  # every step, bit for bit
    # the checkpoint holds the adapters and optimizer state only, and names its base
    meta = read_meta(tmp_path)
    assert meta["lora"]["base"] == str(hf_base) and meta["lora"]["rank"] == 4


def test_a_changed_base_model_is_refused(reference_run, hf_base, tmp_path):
    """The checkpoint names its base and the fingerprint of its bits: a resume with another base, or the same path
    holding other weights, is refused (training and loading alike)."""
    import shutil

    from phi_jax.run_config import base_config
    from phi_jax.sharding import make_mesh
    from phi_jax.trainer import build_trainer, lora_resume_base

    shutil.copytree(hf_base, tmp_path / "base")
    shutil.copytree(reference_run, tmp_path / "run")
    meta_file = tmp_path / "run" / "checkpoints" / str(STEPS) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["lora"]["base"] = str(tmp_path / "base")
    meta_file.write_text(json.dumps(meta))
    load_lora_workdir(tmp_path / "run")  # the same weights at another path: accepted
    trainer = build_trainer(phi_jax.PhiConfig.preset("tiny"), Compute(), optax.sgd(1.0),
                            make_mesh(devices=jax.devices()[:1]), lora=LORA)
    c = base_config()
    c.init_from_hf = str(hf_base)
    with pytest.raises(ValueError, match=r"adapts the base model .* but --config\.init_from_hf="):
        lora_resume_base(trainer, None, c, meta, "the checkpoint")
    shutil.rmtree(tmp_path / "base")
    make_hf_phi(tmp_path / "base", initializer_range=0.1, seed=5)  # other weights at the same path
    c.init_from_hf = str(tmp_path / "base")
    for refused in (lambda: lora_resume_base(trainer, None, c, meta, "the checkpoint"),
                    lambda: load_lora_workdir(tmp_path / "run")):
        with pytest.raises(ValueError, match=r"is not the one the adapters .* were trained on"):
            refused()


def test_exports_of_a_lora_run_load_in_peft_and_transformers(reference_run, hf_base, tmp_path):
    model, _, step = load_lora_workdir(reference_run)
    assert step == STEPS and model.lora.rank == 4
    ours = np.asarray(model(PROMPT)[0])
    export_hf.main([f"--model={reference_run}", f"--out={tmp_path / 'adapter'}", "--peft"])
    np.testing.assert_allclose(peft_logits(hf_base, tmp_path / "adapter", PROMPT), ours, atol=ATOL, rtol=0)
    export_hf.main([f"--model={reference_run}", f"--out={tmp_path / 'merged'}", "--merge_lora"])
    np.testing.assert_allclose(hf_logits(tmp_path / "merged", PROMPT), ours, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(phi_jax.from_pretrained(reference_run)(PROMPT)[0]), ours, atol=1e-5)
    with pytest.raises(ValueError, match="is a LoRA run: pass --merge_lora"):
        export_hf.main([f"--model={reference_run}", f"--out={tmp_path / 'plain'}"])
    # the adapters continue training from the PEFT directory: the same loss as the run's own model
    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import make_mesh
    from phi_jax.trainer import build_trainer

    lora = LoraConfig(rank=4, alpha=8.0)
    trainer = build_trainer(model.cfg, Compute(), make_optimizer(1e-3), make_mesh(devices=jax.devices()[:1]),
                            lora=lora)
    state = trainer.init_state(init_from=hf_base, adapters_from=tmp_path / "adapter")
    batch = {"inputs": PROMPT[:, :-1].astype(np.int32), "targets": PROMPT[:, 1:].astype(np.int32),
             "positions": np.arange(299, dtype=np.int32)[None], "segment_ids": np.ones((1, 299), np.int32),
             "loss_mask": np.ones((1, 299), np.float32)}
    total, count = trainer.eval_step(state, batch)
    expected = optax.softmax_cross_entropy_with_integer_labels(ours[:, :-1], batch["targets"]).mean()
    np.testing.assert_allclose(float(total) / float(count), float(expected), rtol=1e-5)
