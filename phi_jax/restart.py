"""What a restart may change. A checkpoint records its run config and data identity; resuming with another data
path, other shards under the same path, tokenizer, seq_len, global batch, packing, seed or data mixture would
silently reuse a data position that means something else, so those changes are refused unless named in
`--config.allow_changes`. Everything else (learning rate, total_steps, cadences, mesh, sharding, micro-batch, ...)
may change. Rules: docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from phi_jax.validate import flatten

CORE = ("seq_len", "batch_size", "seed")
# Not what the data is: where the embedded corpus is built (data.path is resolved) and whether shards are re-hashed.
NOT_IDENTITY = {"data.cache_dir", "data.verify_checksums"}


def _plain(x: Any) -> Any:
    # tuples -> lists, as a checkpoint's JSON holds them; a ConfigDict inside a list becomes a dict
    return json.loads(json.dumps(x, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))


def identity(run: dict, data: dict) -> dict[str, Any]:
    """The keys a restart must keep: seq_len, batch_size, seed, every data.* setting (so keys added later, such as
    a data mixture, are covered too), the resolved shard path, the shards themselves (their recorded sizes and
    checksums: other shards under the same path are other data) and the tokenizer's own identity. A key one side
    lacks (a checkpoint written before it was recorded) is not compared."""
    flat = flatten(_plain(run))
    out = {k: flat[k] for k in CORE if k in flat}
    out.update({k: v for k, v in flat.items() if k.startswith("data.") and k not in NOT_IDENTITY})
    for key in ("path", "tokenizer", "shards"):  # resolved: "" -> the embedded corpus's directory and tokenizer;
        if key in data:  # shards: a digest of the shard files' recorded sizes and checksums (metadata.json)
            out[f"data.{key}"] = _plain(data[key])
    return out


def _allowed(key: str, allowed: set[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def check_restart(saved_meta: dict, c: ml_collections.ConfigDict, data_identity: dict, where: str) -> None:
    """Raises ValueError listing every identity change not named in c.allow_changes."""
    saved = identity(saved_meta.get("run", {}), saved_meta.get("data", {}))
    new = identity(c.to_dict(), data_identity)
    allowed = {a.strip() for a in c.allow_changes.split(",") if a.strip()}
    if unknown := sorted(a for a in allowed if not any(_allowed(k, {a}) for k in new)):
        raise ValueError(f"--config.allow_changes names {unknown}, which a restart does not check; the checked keys "
                         f"are {sorted(new)}.")
    changed = {k: (saved[k], new[k]) for k in sorted(saved.keys() & new.keys()) if saved[k] != new[k]}
    if refused := {k: v for k, v in changed.items() if not _allowed(k, allowed)}:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ValueError(f"Resuming {where} with changes that would reuse its saved data position for other data: "
                         f"{listed}. Use a new --workdir, restore the old values, or accept them with "
                         f"--config.allow_changes={','.join(refused)}.")


def loss_scale_reset(saved_meta: dict, c: ml_collections.ConfigDict) -> bool:
    """Whether the restored loss scale must start afresh: fp16's dynamic scale means nothing to a bf16/fp32 run,
    and a bf16/fp32 run's static scale of 1 would start fp16 training unscaled (underflowing gradients)."""
    before = saved_meta.get("run", {}).get("dtype", c.dtype)
    return before != c.dtype and "float16" in (before, c.dtype)
