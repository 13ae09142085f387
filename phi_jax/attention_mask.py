"""The one definition of which keys a query sees: causal order and packed-document segment ids.

`attention_mask` builds any block of the mask: the whole [T, S] matrix for XLA attention and the KV cache, or one
[block_q, block_k] tile inside a Pallas kernel (offsets `q_start`, `k_start`), in either orientation (the backward
kernels' transposed scores put keys on the rows). `causal_segment_mask` is its [B, T, S] form for XLA attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def attention_mask(shape: tuple[int, int], *, causal: bool, q_start=0, k_start=0,
                   q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                   keys_on_rows: bool = False) -> jax.Array | None:
    """bool [..., rows, cols] (True = attend), or None when nothing is masked (not causal, no segment ids).

    Query `q_start + i` sees key `k_start + j` when the key is not later (if `causal`) and both carry the same
    segment id. Rows are queries and columns keys, or the reverse with `keys_on_rows`. The segment ids must already
    broadcast to `shape` in that orientation (e.g. [rows, 1] and [1, cols], or a lane-broadcast TPU tile); leading
    dims (a batch) pass through. Offsets may be traced int32 scalars (program ids, a cache index).
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("attention_mask takes segment ids for both the queries and the keys, or for neither.")
    q_axis, k_axis = (1, 0) if keys_on_rows else (0, 1)
    mask = None
    if causal:
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis)
        mask = k_pos <= q_pos
    if q_segment_ids is not None:
        same = q_segment_ids == kv_segment_ids
        mask = same if mask is None else jnp.logical_and(mask, same)
    return mask


def causal_segment_mask(segment_ids: jax.Array | None, seq_len: int, *, kv_segment_ids: jax.Array | None = None,
                        q_start: jax.Array | int = 0, causal: bool = True) -> jax.Array:
    """[B or 1, T, S] bool (True = attend): key slot s at or before query t's slot `q_start + t` (if `causal`), and
    in the query's segment. segment_ids: the queries' [B, T] (None: one segment); kv_segment_ids: the keys' [B, S]
    (default: the queries' own, S = T), e.g. a KV cache's slots, where segment 0 marks empty or padding."""
    kv = segment_ids if kv_segment_ids is None else kv_segment_ids
    kv_len = seq_len if kv is None else kv.shape[1]
    mask = attention_mask((seq_len, kv_len), causal=causal, q_start=q_start,
                          q_segment_ids=None if segment_ids is None else segment_ids[:, :, None],
                          kv_segment_ids=None if segment_ids is None else kv[:, None, :])
    if mask is None:
        return jnp.ones((1, seq_len, kv_len), bool)
    return mask if mask.ndim == 3 else mask[None]
