"""Pieces shared by the GPU (Triton) and TPU (Mosaic) FlashAttention lowerings.

Block-iteration bounds for causal skipping live here as plain integer functions so the kernels, their index maps
and the tests all use one definition.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

# Finite, very negative logit for masked entries: -inf would give inf - inf = NaN in the online-softmax
# rescaling when a whole block is masked. Masked probabilities are also zeroed explicitly, so a fully masked block
# adds nothing. A kernel that scales after masking uses `masked_logit`.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def masked_logit(scale: float) -> float:
    """The unscaled logit given to masked scores by a kernel that multiplies by `scale` after masking (the GPU
    kernel's base-2 FMA `s * scale - m`): MASK_VALUE in the scaled domain, so it stays finite for any scale.
    MASK_VALUE * scale itself overflows to -inf once scale > 1/0.7 (sm_scale > 0.99 in base 2); a row whose first
    visited block is fully masked then gets m = -inf, and the rescale exp2(m_prev - m) = exp2(-inf - -inf) = NaN."""
    return MASK_VALUE / max(scale, 1.0)


def check_sm_scale(sm_scale: float) -> None:
    """Softmax scales must be positive and finite: the GPU kernel takes each row's max before scaling."""
    if not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"{sm_scale=} must be a positive finite number (default: head_dim ** -0.5).")


# Segment id given to padded positions by the wrapper; never equal to a real (user) segment id.
PAD_SEGMENT_ID = int(np.iinfo(np.int32).min)


def causal_num_kv_blocks(q_block, block_q: int, block_k: int, num_kv_blocks: int):
    """Key blocks a causal query block visits: [0, this). Blocks wholly above the diagonal are never computed.

    The last query row of block `q_block` is (q_block + 1) * block_q - 1; it sees keys up to that index.
    Works on Python ints and on traced int32 scalars (program ids).
    """
    if isinstance(q_block, int):
        return min(((q_block + 1) * block_q + block_k - 1) // block_k, num_kv_blocks)
    return jnp.minimum(lax.div((q_block + 1) * block_q + block_k - 1, block_k), num_kv_blocks)


def causal_first_q_block(kv_block, block_k: int, block_q: int):
    """First query block that a causal key block contributes to: query blocks before it are fully masked."""
    if isinstance(kv_block, int):
        return (kv_block * block_k) // block_q
    return lax.div(kv_block * block_k, block_q)


def block_is_visible(q_block, block_q: int, kv_block, block_k: int):
    """True unless key block `kv_block` lies entirely above the causal diagonal of query block `q_block`."""
    return kv_block * block_k <= (q_block + 1) * block_q - 1
