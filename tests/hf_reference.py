"""Builds random-init transformers PhiForCausalLM checkpoints (the reference) for the parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def make_hf_phi(out_dir: Path, *, seed: int = 0, **config) -> Path:
    """A random PhiForCausalLM saved with transformers' own save_pretrained; returns its directory."""
    import torch
    import transformers

    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    cfg.update(config)
    torch.manual_seed(seed)
    model = transformers.PhiForCausalLM(transformers.PhiConfig(**cfg)).eval()
    with torch.no_grad():  # LayerNorm/bias init is ones/zeros: randomise them so the mapping is really tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    return out_dir


def hf_logits(model_dir: Path, input_ids: np.ndarray) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.tensor(input_ids)).logits.float().numpy()


def to_legacy(native_dir: Path, out_dir: Path, layout: str) -> Path:
    """Rewrites a native checkpoint in a 2023 layout: renamed keys, q/k/v concatenated into Wqkv."""
    cfg = json.loads((native_dir / "config.json").read_text())
    t = load_file(native_dir / "model.safetensors")
    n = cfg["num_hidden_layers"]
    block = (lambda i: f"layers.{i + 1}") if layout == "mixformer" else (lambda i: f"transformer.h.{i}")
    out = {}
    for i in range(n):
        src, dst = f"model.layers.{i}", block(i)
        for kind in ("weight", "bias"):
            out[f"{dst}.ln.{kind}"] = t[f"{src}.input_layernorm.{kind}"]
            out[f"{dst}.mixer.Wqkv.{kind}"] = np.concatenate([t[f"{src}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{dst}.mixer.out_proj.{kind}"] = t[f"{src}.self_attn.dense.{kind}"]
            out[f"{dst}.mlp.fc1.{kind}"] = t[f"{src}.mlp.fc1.{kind}"]
            out[f"{dst}.mlp.fc2.{kind}"] = t[f"{src}.mlp.fc2.{kind}"]
    if layout == "mixformer":
        out["layers.0.wte.weight"] = t["model.embed_tokens.weight"]
        final_ln, head = f"layers.{n + 1}.ln", f"layers.{n + 1}.linear"
    else:
        out["transformer.embd.wte.weight"] = t["model.embed_tokens.weight"]
        final_ln, head = "lm_head.ln", "lm_head.linear"
    for kind in ("weight", "bias"):
        out[f"{final_ln}.{kind}"] = t[f"model.final_layernorm.{kind}"]
        out[f"{head}.{kind}"] = t[f"lm_head.{kind}"]
    out_dir.mkdir(parents=True)
    save_file(out, out_dir / "model.safetensors", metadata={"format": "pt"})
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    legacy_cfg = {
        "model_type": "mixformer-sequential" if layout == "mixformer" else "phi-msft",
        "vocab_size": cfg["vocab_size"], "n_embd": cfg["hidden_size"], "n_layer": n,
        "n_head": cfg["num_attention_heads"], "n_inner": cfg["intermediate_size"],
        "rotary_dim": int(head_dim * cfg["rope_parameters"]["partial_rotary_factor"]),
        "n_positions": cfg["max_position_embeddings"], "layer_norm_epsilon": cfg["layer_norm_eps"],
        "activation_function": "gelu_new",
    }
    (out_dir / "config.json").write_text(json.dumps(legacy_cfg))
    return out_dir
