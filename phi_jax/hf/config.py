"""config.json <-> PhiConfig, for the native transformers 4.x / 5.x files and the 2023 remote-code ones."""

from __future__ import annotations

from typing import Any

from phi_jax.config import PhiConfig

NATIVE_TYPES = ("phi",)
LEGACY_TYPES = ("mixformer-sequential", "phi-msft")  # the 2023 MixFormerSequential and remote-code layouts


def _require(d: dict, key: str, model_type: str) -> Any:
    if key not in d or d[key] is None:
        raise ValueError(f"config.json (model_type {model_type!r}) has no {key!r}; the file is incomplete.")
    return d[key]


def phi_config_from_hf(d: dict) -> PhiConfig:
    """Reads a Hugging Face config.json dict. Unsupported models and features are errors, not approximations."""
    model_type = d.get("model_type")
    if model_type in NATIVE_TYPES:
        rope = d.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {rope['rope_type']!r} is not supported; phi-1.5 uses 'default' rotary.")
        if d.get("qk_layernorm"):
            raise ValueError("qk_layernorm=true is not supported (phi-1/phi-1.5/phi-2 do not use it).")
        heads = _require(d, "num_attention_heads", model_type)
        if d.get("num_key_value_heads") not in (None, heads):
            raise ValueError(f"num_key_value_heads={d['num_key_value_heads']} != num_attention_heads={heads}: "
                             "grouped-query attention is not supported.")
        if d.get("tie_word_embeddings"):
            raise ValueError("tie_word_embeddings=true is not supported: phi's lm_head is its own matrix.")
        hidden, act = _require(d, "hidden_size", model_type), d.get("hidden_act", "gelu_new")
        fields = dict(vocab_size=_require(d, "vocab_size", model_type), hidden_size=hidden,
                      intermediate_size=_require(d, "intermediate_size", model_type),
                      num_layers=_require(d, "num_hidden_layers", model_type), num_heads=heads,
                      rotary_dim=int(hidden // heads * factor), rope_theta=float(theta),
                      layer_norm_eps=d.get("layer_norm_eps", 1e-5),
                      max_position_embeddings=d.get("max_position_embeddings", 2048))
    elif model_type in LEGACY_TYPES:
        hidden, act = _require(d, "n_embd", model_type), d.get("activation_function", "gelu_new")
        if d.get("n_head_kv") not in (None, d.get("n_head")):
            raise ValueError("n_head_kv != n_head: grouped-query attention is not supported.")
        fields = dict(vocab_size=_require(d, "vocab_size", model_type), hidden_size=hidden,
                      intermediate_size=d.get("n_inner") or 4 * hidden, num_layers=_require(d, "n_layer", model_type),
                      num_heads=_require(d, "n_head", model_type), rotary_dim=_require(d, "rotary_dim", model_type),
                      layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
                      max_position_embeddings=d.get("n_positions", 2048))
    else:
        raise ValueError(f"Unsupported model_type {model_type!r}: phi_jax reads phi checkpoints "
                         f"({', '.join(NATIVE_TYPES + LEGACY_TYPES)}).")
    if act != "gelu_new":
        raise ValueError(f"activation {act!r} is not supported: phi uses 'gelu_new' (the tanh approximation).")
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(d.get(key), int):
            fields[key] = d[key]
    return PhiConfig(**fields)


def phi_config_to_hf(cfg: PhiConfig, dtype: str) -> dict:
    """A transformers 5.x config.json that 4.x also reads (top-level rotary keys are kept for 4.x)."""
    factor = cfg.rotary_dim / cfg.head_dim
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "hidden_act": "gelu_new",
        "max_position_embeddings": cfg.max_position_embeddings,
        "layer_norm_eps": cfg.layer_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor},
        "partial_rotary_factor": factor,
        "rope_theta": cfg.rope_theta,
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": cfg.initializer_range,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "dtype": dtype,
    }
