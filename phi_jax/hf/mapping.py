"""The Hugging Face <-> phi_jax parameter mapping: one declarative table per layout, plus three transforms.

A rule maps one phi_jax parameter to one or more Hugging Face tensors. Rules under `layers.` are per layer:
their keys hold `{i}` and the phi_jax parameter stacks all layers on a leading axis. torch Linear weights are
[out, in]; phi_jax kernels are [*in_dims, *out_dims].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import numpy as np

from phi_jax.config import PhiConfig

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Same:
    """One tensor, the same shape on both sides."""

    def hf_shapes(self, shape: Shape, n: int) -> list[Shape]:
        return [shape]

    def to_ours(self, tensors: list[np.ndarray], shape: Shape) -> np.ndarray:
        return tensors[0]

    def to_hf(self, x: np.ndarray, n: int) -> list[np.ndarray]:
        return [x]


@dataclasses.dataclass(frozen=True)
class Flat:
    """n flat tensors concatenated, reshaped to ours (q/k/v biases -> [3, heads, head_dim])."""

    def hf_shapes(self, shape: Shape, n: int) -> list[Shape]:
        return [(math.prod(shape) // n,)] * n

    def to_ours(self, tensors: list[np.ndarray], shape: Shape) -> np.ndarray:
        return np.concatenate(tensors).reshape(shape)

    def to_hf(self, x: np.ndarray, n: int) -> list[np.ndarray]:
        return np.split(x.reshape(-1), n)


@dataclasses.dataclass(frozen=True)
class Linear:
    """n torch Linear weights [out/n, in], stacked along out, transposed to ours [*in_dims, *out_dims]."""

    n_in: int = 1  # how many leading dims of our kernel are input dims

    def hf_shapes(self, shape: Shape, n: int) -> list[Shape]:
        fan_in, fan_out = math.prod(shape[: self.n_in]), math.prod(shape[self.n_in:])
        return [(fan_out // n, fan_in)] * n

    def to_ours(self, tensors: list[np.ndarray], shape: Shape) -> np.ndarray:
        return np.concatenate(tensors, axis=0).T.reshape(shape)

    def to_hf(self, x: np.ndarray, n: int) -> list[np.ndarray]:
        w = x.reshape(math.prod(x.shape[: self.n_in]), -1).T
        return [np.ascontiguousarray(t) for t in np.split(w, n, axis=0)]


Transform = Same | Flat | Linear


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str  # dotted path in the model's parameter state
    hf: tuple[str, ...]  # Hugging Face keys; `{i}` is the layer (plus the layout's offset), `{last}` the final slot
    transform: Transform

    @property
    def per_layer(self) -> bool:
        return self.ours.startswith("layers.")


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    marker: str  # a key only this layout has
    rules: tuple[Rule, ...]
    layer_offset: int = 0

    def keys(self, rule: Rule, cfg: PhiConfig, layer: int | None) -> list[str]:
        i = None if layer is None else layer + self.layer_offset
        return [k.format(i=i, last=cfg.num_layers + 1) for k in rule.hf]


def _qkv(fmt: str) -> tuple[str, ...]:
    return tuple(fmt.format(p=p, i="{i}") for p in "qkv")


NATIVE = Layout("PhiForCausalLM", "model.embed_tokens.weight", (
    Rule("embed_tokens", ("model.embed_tokens.weight",), Same()),
    Rule("layers.input_layernorm.scale", ("model.layers.{i}.input_layernorm.weight",), Same()),
    Rule("layers.input_layernorm.bias", ("model.layers.{i}.input_layernorm.bias",), Same()),
    Rule("layers.attn.qkv.kernel", _qkv("model.layers.{i}.self_attn.{p}_proj.weight"), Linear(1)),
    Rule("layers.attn.qkv.bias", _qkv("model.layers.{i}.self_attn.{p}_proj.bias"), Flat()),
    Rule("layers.attn.dense.kernel", ("model.layers.{i}.self_attn.dense.weight",), Linear(2)),
    Rule("layers.attn.dense.bias", ("model.layers.{i}.self_attn.dense.bias",), Same()),
    Rule("layers.mlp.fc1.kernel", ("model.layers.{i}.mlp.fc1.weight",), Linear(1)),
    Rule("layers.mlp.fc1.bias", ("model.layers.{i}.mlp.fc1.bias",), Same()),
    Rule("layers.mlp.fc2.kernel", ("model.layers.{i}.mlp.fc2.weight",), Linear(1)),
    Rule("layers.mlp.fc2.bias", ("model.layers.{i}.mlp.fc2.bias",), Same()),
    Rule("final_layernorm.scale", ("model.final_layernorm.weight",), Same()),
    Rule("final_layernorm.bias", ("model.final_layernorm.bias",), Same()),
    Rule("lm_head.kernel", ("lm_head.weight",), Linear(1)),
    Rule("lm_head.bias", ("lm_head.bias",), Same()),
))


def _legacy(name: str, marker: str, embed: str, block: str, final_ln: str, head: str, offset: int) -> Layout:
    """The 2023 layouts share one block structure; q, k, v are contiguous thirds of `Wqkv` along dim 0."""
    return Layout(name, marker, (
        Rule("embed_tokens", (embed,), Same()),
        Rule("layers.input_layernorm.scale", (f"{block}.ln.weight",), Same()),
        Rule("layers.input_layernorm.bias", (f"{block}.ln.bias",), Same()),
        Rule("layers.attn.qkv.kernel", (f"{block}.mixer.Wqkv.weight",), Linear(1)),
        Rule("layers.attn.qkv.bias", (f"{block}.mixer.Wqkv.bias",), Flat()),
        Rule("layers.attn.dense.kernel", (f"{block}.mixer.out_proj.weight",), Linear(2)),
        Rule("layers.attn.dense.bias", (f"{block}.mixer.out_proj.bias",), Same()),
        Rule("layers.mlp.fc1.kernel", (f"{block}.mlp.fc1.weight",), Linear(1)),
        Rule("layers.mlp.fc1.bias", (f"{block}.mlp.fc1.bias",), Same()),
        Rule("layers.mlp.fc2.kernel", (f"{block}.mlp.fc2.weight",), Linear(1)),
        Rule("layers.mlp.fc2.bias", (f"{block}.mlp.fc2.bias",), Same()),
        Rule("final_layernorm.scale", (f"{final_ln}.weight",), Same()),
        Rule("final_layernorm.bias", (f"{final_ln}.bias",), Same()),
        Rule("lm_head.kernel", (f"{head}.weight",), Linear(1)),
        Rule("lm_head.bias", (f"{head}.bias",), Same()),
    ), offset)


MIXFORMER = _legacy("MixFormerSequentialForCausalLM", "layers.0.wte.weight", "layers.0.wte.weight",
                    "layers.{i}", "layers.{last}.ln", "layers.{last}.linear", offset=1)
REMOTE_CODE = _legacy("PhiForCausalLM (2023 remote code)", "transformer.embd.wte.weight",
                      "transformer.embd.wte.weight", "transformer.h.{i}", "lm_head.ln", "lm_head.linear", offset=0)
LAYOUTS = (NATIVE, MIXFORMER, REMOTE_CODE)


def detect_layout(keys) -> Layout:
    keys = set(keys)
    found = [layout for layout in LAYOUTS if layout.marker in keys]
    if len(found) != 1:
        raise ValueError(f"Cannot tell the checkpoint's layout: expected exactly one of the keys "
                         f"{[lay.marker for lay in LAYOUTS]}, found {[lay.marker for lay in found]}.")
    return found[0]


def expected_hf_shapes(layout: Layout, cfg: PhiConfig, shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """Every Hugging Face key of `layout` with its shape, given our parameter shapes (stacked layers included)."""
    out = {}
    for rule in layout.rules:
        shape = shapes[rule.ours]
        if rule.per_layer:
            for layer in range(cfg.num_layers):
                keys = layout.keys(rule, cfg, layer)
                out.update(zip(keys, rule.transform.hf_shapes(shape[1:], len(keys)), strict=True))
        else:
            keys = layout.keys(rule, cfg, None)
            out.update(zip(keys, rule.transform.hf_shapes(shape, len(keys)), strict=True))
    return out


def check_keys_and_shapes(expected: Mapping[str, Shape], found: Mapping[str, Shape], source: str) -> None:
    """The key sets must match exactly and every shape must agree; the error names each offending key."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    problems = [f"missing tensor {k!r} (expected shape {tuple(expected[k])})" for k in missing]
    problems += [f"unexpected tensor {k!r} (shape {tuple(found[k])})" for k in unexpected]
    problems += [f"tensor {k!r} has shape {tuple(found[k])}, expected {tuple(expected[k])}"
                 for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{source} does not match the phi architecture in its config.json:\n  {shown}")


def hf_to_ours(layout: Layout, cfg: PhiConfig, shapes: Mapping[str, Shape],
               get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Converts tensors fetched by `get(key)` into our parameters (path -> array), stacking the layers."""
    params = {}
    for rule in layout.rules:
        shape = shapes[rule.ours]
        if rule.per_layer:
            params[rule.ours] = np.stack([
                rule.transform.to_ours([get(k) for k in layout.keys(rule, cfg, layer)], shape[1:])
                for layer in range(cfg.num_layers)])
        else:
            params[rule.ours] = rule.transform.to_ours([get(k) for k in layout.keys(rule, cfg, None)], shape)
    return params


def ours_to_hf(cfg: PhiConfig, get: Callable[[str, int | None], np.ndarray]) -> dict[str, np.ndarray]:
    """Our parameters -> the native PhiForCausalLM tensors. `get(path, layer)` gives one parameter by its path in
    the stacked layout (`layer` None), or one layer of a per-layer parameter, so either layer layout is read as
    it is."""
    out = {}
    for rule in NATIVE.rules:
        for layer in range(cfg.num_layers) if rule.per_layer else [None]:
            keys = NATIVE.keys(rule, cfg, layer)
            out.update(zip(keys, rule.transform.to_hf(get(rule.ours, layer), len(keys)), strict=True))
    return out
